"""``krasr-batch export`` (SRT, VTT, txt, JSON Lines) and ``krasr-batch inspect`` on hand-built output folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from krasr_batch.export import safe_names, timestamp
from tests.test_eval import WITH_SUSPECT, frow, invoke, seg, write_output

SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})$")
VTT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})$")

RUN_JSON = {
    "model": "KRASR/kazakh-russian-asr-whisper-small-full-ft",
    "settings": {"decode": {"language": "kazakh", "beams": 3}, "segment": {"max_segment_s": 30.0},
                 "resources": {"actors": 2}},
    "counts": {"files": 4}, "audio_s": 95.0, "speech_s": 60.0, "wall_s": 10.0, "rtfx": 9.5,
}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Two ok files (one with segments out of order and an empty one), one without speech, two failures."""
    segments = [
        seg("calls/a.wav", 1, 4.2, 9.75, "Екінші сөйлем, <маңызды> & ұзақ.", worker="n1:10:cuda", decode_s=0.8, batch_size=2),
        seg("calls/a.wav", 0, 0.5, 4.0, "Бірінші сөйлем.", worker="n1:10:cuda", decode_s=0.8, batch_size=2),
        seg("calls/a.wav", 2, 10.0, 12.0, "", worker="n1:11:cuda", decode_s=0.3, batch_size=1),
        seg("calls/a.wav", 3, 12.5, 30.2, "Соңғы\nжол", worker="n1:11:cuda", decode_s=0.3, batch_size=1,
            truncated=True),
        seg("s3://bucket/b.mp3", 0, 0.0, 3661.5, "рахмет рахмет рахмет рахмет", worker="n1:11:cuda", decode_s=1.0,
            batch_size=1),
    ]
    files = [
        frow("calls/a.wav", "Бірінші сөйлем. Екінші …", duration_s=30.0, speech_s=20.0),
        frow("s3://bucket/b.mp3", "рахмет", duration_s=3700.0, speech_s=3600.0),
        frow("silence", "", duration_s=5.0, speech_s=0.0),
        frow("gone1", status="error", error="gone1: no such file", error_kind="not_found"),
        frow("gone2", status="error", error="gone2: no such file", error_kind="not_found"),
        frow("junk", status="error", error="junk: cannot decode", error_kind="undecodable"),
    ]
    return write_output(tmp_path / "out", files, segments, run=RUN_JSON)


def _srt_cues(text: str) -> list[tuple[int, float, float, str]]:
    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        m = SRT_TIME.match(lines[1])
        assert m, lines
        g = [int(x) for x in m.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        cues.append((int(lines[0]), start, end, "\n".join(lines[2:])))
    return cues


def _check_order(cues, duration_s: float) -> None:
    prev = 0.0
    for _, start, end, _ in cues:
        assert prev <= start <= end <= duration_s
        prev = start


def test_timestamp():
    assert timestamp(0) == "00:00:00,000"
    assert timestamp(3661.5) == "01:01:01,500"
    assert timestamp(59.9996, ".") == "00:01:00.000"
    assert timestamp(-1.0) == "00:00:00,000"
    assert timestamp(100 * 3600 + 0.25) == "100:00:00,250"


def test_safe_names_are_safe_and_unique():
    ids = ["calls/a.wav", "calls_a.wav", "CALLS/A.WAV", "s3://bucket/x/y.flac", "../../etc/passwd", "con", "", "..."]
    names = safe_names(ids)
    assert len(set(n.lower() for n in names.values())) == len(ids)
    for n in names.values():
        assert n and "/" not in n and "\\" not in n and not n.startswith(".") and len(n) <= 130
    assert names["s3://bucket/x/y.flac"] == "bucket_x_y"
    assert names["con"] != "con"
    assert names["calls/a.wav"].startswith("calls_a-")  # a clash gets a hash of the id
    assert safe_names(reversed(ids)) == names


def test_export_srt(out: Path):
    r = invoke("export", str(out), "--format", "srt")
    assert r.exit_code == 0, r.output
    d = out / "export" / "srt"
    assert sorted(p.name for p in d.iterdir()) == ["bucket_b.srt", "calls_a.srt", "silence.srt"]
    assert "exported 3 files (4 cues)" in r.stdout
    assert "note: this run has no word times, so each cue is a whole segment" in r.stderr
    cues = _srt_cues((d / "calls_a.srt").read_text(encoding="utf-8"))
    assert [c[0] for c in cues] == [1, 2, 3]  # the empty segment is skipped
    assert cues[0][3] == "Бірінші сөйлем." and cues[2][3] == "Соңғы жол"
    _check_order(cues, 30.0)
    assert cues[2][2] == 30.0  # clamped to the file's duration
    long = _srt_cues((d / "bucket_b.srt").read_text(encoding="utf-8"))
    assert long[0][1:3] == (0.0, 3661.5)
    assert (d / "silence.srt").read_text(encoding="utf-8") == ""


def test_export_vtt(out: Path, tmp_path: Path):
    to = tmp_path / "subs"
    r = invoke("export", str(out), "--format", "vtt", "--to", str(to))
    assert r.exit_code == 0, r.output
    text = (to / "calls_a.vtt").read_text(encoding="utf-8")
    assert text.startswith("WEBVTT\n\n")
    lines = text.splitlines()
    times = [VTT_TIME.match(line) for line in lines if "-->" in line]
    assert len(times) == 3 and all(times)
    starts = [int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 1000 for m in times]
    ends = [int(m[5]) * 3600 + int(m[6]) * 60 + int(m[7]) + int(m[8]) / 1000 for m in times]
    assert starts == sorted(starts) and all(s <= e <= 30.0 for s, e in zip(starts, ends))
    assert "Екінші сөйлем, &lt;маңызды&gt; &amp; ұзақ." in lines
    assert (to / "silence.vtt").read_text(encoding="utf-8") == "WEBVTT\n"


def test_export_txt_and_jsonl(out: Path):
    assert invoke("export", str(out), "--format", "txt").exit_code == 0
    txt = (out / "export" / "txt" / "calls_a.txt").read_text(encoding="utf-8")
    assert txt == "Бірінші сөйлем. Екінші сөйлем, <маңызды> & ұзақ. Соңғы\nжол\n"
    assert invoke("export", str(out), "--format", "jsonl").exit_code == 0
    rows = [json.loads(line) for line in (out / "export" / "jsonl" / "calls_a.jsonl").read_text("utf-8").splitlines()]
    assert [r["segment_index"] for r in rows] == [0, 1, 3]
    assert rows[2] == {"file_id": "calls/a.wav", "segment_index": 3, "start_s": 12.5, "end_s": 30.2,
                       "text": "Соңғы\nжол", "language": "kk", "truncated": True}
    assert not list((out / "export" / "jsonl").glob("gone*"))


def test_export_bad_format_and_missing_dir(out: Path, tmp_path: Path):
    assert invoke("export", str(out), "--format", "docx").exit_code == 2
    r = invoke("export", str(tmp_path / "nowhere"), "--format", "srt")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_inspect_text(out: Path):
    r = invoke("inspect", str(out))
    assert r.exit_code == 0, r.output
    t = r.stdout
    assert "files: 6 (3 ok, 3 failed, 0 with a warning)" in t
    assert "failed (not_found): 2" in t and "gone1: gone1: no such file" in t
    assert "failed (undecodable): 1" in t and "junk: cannot decode" in t
    assert t.index("not_found") < t.index("undecodable")  # most frequent cause first
    assert f"audio {3735 / 3600:.3f} h, speech {3620 / 3600:.3f} h" in t
    assert ("segments: 5: 1 stopped at the token limit (0 repetition loops, 1 did not fit); 1 suspect by the "
            "quality signals, in 1 files [computed]") in t
    assert "RTFx 9.5" in t
    assert "n1:10:cuda" in t and "n1:11:cuda" in t
    assert "beams=3" in t and "KRASR/kazakh-russian-asr-whisper-small-full-ft" in t
    assert "not complete" in t


def test_inspect_json(out: Path):
    (out / "_SUCCESS").write_text("")
    data = json.loads(invoke("inspect", str(out), "--format", "json").stdout)
    assert (data["files"], data["files_ok"], data["files_failed"]) == (6, 3, 3)
    assert data["complete"] is True
    assert data["failures"][0] == {"kind": "not_found", "count": 2, "examples": [
        {"file_id": "gone1", "error": "gone1: no such file"}, {"file_id": "gone2", "error": "gone2: no such file"}]}
    assert data["audio_h"] == pytest.approx(3735 / 3600) and data["speech_h"] == pytest.approx(3620 / 3600)
    assert (data["segments"], data["truncated_segments"], data["suspect_segments"]) == (5, 1, 1)
    assert data["rtfx"] == 9.5 and data["settings"]["decode"]["beams"] == 3
    workers = {w["worker"]: w for w in data["workers"]}
    assert workers["n1:10:cuda"]["segments"] == 2
    assert workers["n1:10:cuda"]["audio_s"] == pytest.approx(3.5 + 5.55)
    assert workers["n1:10:cuda"]["decode_s"] == pytest.approx(0.8)  # one call of two segments, counted once
    assert workers["n1:11:cuda"]["segments"] == 3
    assert workers["n1:11:cuda"]["audio_s"] == pytest.approx(2.0 + 17.7 + 3661.5)
    assert workers["n1:11:cuda"]["decode_s"] == pytest.approx(1.6)


def test_inspect_without_run_json_and_with_suspect_column(tmp_path: Path):
    segments = [dict(seg("a", 0, 0.0, 2.0, "жақсы"), suspect=True), dict(seg("a", 1, 2.0, 4.0, "иә"), suspect=False)]
    out = write_output(tmp_path / "o", [frow("a", "жақсы иә", duration_s=4.0)], segments, segments_schema=WITH_SUSPECT)
    t = invoke("inspect", str(out)).stdout
    assert "1 suspect by the quality signals, in 1 files [column]" in t and "no run.json" in t
    data = json.loads(invoke("inspect", str(out), "--format", "json").stdout)
    assert data["rtfx"] is None and data["run_json"] is False and data["suspect_source"] == "column"


def test_parts_with_and_without_new_columns_read_together(tmp_path: Path):
    out = tmp_path / "o"
    write_output(out, [frow("old", "рахмет рахмет рахмет рахмет", "рахмет")],
                 [seg("old", 0, 0.0, 2.0, "рахмет рахмет рахмет рахмет")], part="part-a-000000.parquet")
    write_output(out, [frow("new", "жақсы", "жақсы")], [dict(seg("new", 0, 0.0, 1.0, "жақсы"), suspect=True)],
                 segments_schema=WITH_SUSPECT, part="part-b-000000.parquet")
    data = json.loads(invoke("inspect", str(out), "--format", "json").stdout)
    assert data["suspect_segments"] == 2 and data["suspect_source"] == "column+computed"
    assert json.loads(invoke("eval", str(out), "--format", "json").stdout)["overall"]["hallucination_like"] == 2


def test_inspect_counts_the_clips_that_went_on_past_the_cards_limit(tmp_path: Path):
    """A file decoded whole at the "fit" budget of its length, above the card's limit, went on past the card's
    limit (its cut text to that budget): ``inspect`` counts them from the rows, as the run's summary did, with
    or without run.json."""
    segments = [
        seg("cut", 0, 0.0, 12.0, "ұзақ сөйлем", audio_s=12.0, max_new_tokens=180),  # went on: card's 80, budget 180
        seg("fits", 0, 0.0, 12.0, "қысқа", audio_s=12.0, max_new_tokens=80),  # the card's 80 held it
        seg("long", 0, 0.0, 12.0, "бір", audio_s=12.0, max_new_tokens=180),  # a window of a longer file
        seg("long", 1, 12.5, 30.0, "екі", audio_s=17.5, max_new_tokens=240),
        seg("none", 0, 0.0, 12.0, "барлығы", audio_s=12.0, max_new_tokens=448),  # --token-limit none
    ]
    files = [frow("cut", duration_s=12.0), frow("fits", duration_s=12.0), frow("long", duration_s=31.0),
             frow("none", duration_s=12.0)]
    for name, run in [("o", None), ("r", RUN_JSON)]:
        out = write_output(tmp_path / name, files, segments, run=run)
        assert json.loads(invoke("inspect", str(out), "--format", "json").stdout)["clips_past_card_limit"] == 1
        assert "\n  1 clip that the card's limit cut short went on to the fit budget\n" in invoke("inspect", str(out)).stdout
    out = write_output(tmp_path / "n", files[1:], segments[1:])
    assert json.loads(invoke("inspect", str(out), "--format", "json").stdout)["clips_past_card_limit"] == 0
    assert "went on to the fit budget" not in invoke("inspect", str(out)).stdout
