"""The same clips as a JSONL manifest, a folder, a CSV, a NeMo manifest and dataset shards give the same texts;
``plan`` gives the run's statuses; ``export --format dataset`` round-trips through `datasets` and back.

The pipeline runs in-process on the session's Ray (tiny-random model), to keep these runs to seconds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import pyarrow.dataset as pads
import pytest
from click.testing import CliRunner

from krasr_batch.cli import main
from krasr_batch.pipeline import plan, run
from krasr_batch.settings import build_settings

from .conftest import read_jsonl, write_manifest

pytestmark = pytest.mark.e2e  # Ray

# wav 16 kHz, flac 44.1 kHz stereo, ogg, mp3, wav 16 kHz: every decoder; the 16 kHz wavs round-trip exactly.
# Russian only: a folder has no per-file language, so every shape decodes with the run's --language russian
CLIPS = ["ru_000", "ru_001", "ru_002", "ru_003", "ru_005"]
ROUND_TRIP = ["ru_000", "ru_005"]


def _files(out) -> dict[str, dict]:
    return {r["file_id"]: r for r in pads.dataset(out / "files", format="parquet").to_table().to_pylist()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus, tiny_model, ray_local):
    tmp = tmp_path_factory.mktemp("shapes")
    by_id = {r["id"]: r for r in read_jsonl(corpus / "clips.jsonl")}
    clips = [by_id[i] for i in CLIPS]
    bad = read_jsonl(corpus / "bad.jsonl")
    manifest = write_manifest(tmp / "all.jsonl", clips + bad, base=corpus)
    settings = build_settings({"model": str(tiny_model), "language": "russian", "flush_s": 0.0})
    out = tmp / "jsonl"
    run(str(manifest), str(out), settings, progress=False)
    return tmp, clips, manifest, settings, out


def _texts_by_clip(out, key) -> dict[str, str]:
    return {key(fid): r["text"] for fid, r in _files(out).items()}


def test_every_input_shape_gives_the_jsonl_texts(setup, corpus):
    from datasets import Audio, Dataset

    tmp, clips, _, settings, base_out = setup
    want = {i: r["text"] for i, r in _files(base_out).items() if i in CLIPS}
    assert all(want.values()) and len(want) == len(CLIPS)
    ext = {r["id"]: os.path.splitext(r["path"])[1] for r in clips}

    folder = tmp / "folder"
    folder.mkdir()
    for r in clips:
        shutil.copy(corpus / r["path"], folder / f"{r['id']}{ext[r['id']]}")
        (folder / f"{r['id']}.txt").write_text(r["text"], encoding="utf-8")
    (folder / "readme.md").write_text("not audio", encoding="utf-8")

    table = tmp / "clips.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "text"])
        w.writerows([r["id"], str(corpus / r["path"]), r["text"]] for r in clips)

    nemo = tmp / "nemo.json"
    nemo.write_text("".join(json.dumps({"audio_filepath": str(corpus / r["path"]), "text": r["text"],
                                        "duration": 1.0}, ensure_ascii=False) + "\n" for r in clips), encoding="utf-8")

    shards = tmp / "hf"
    shards.mkdir()
    for k, part in enumerate((clips[:3], clips[3:])):
        ds = Dataset.from_dict({"audio": [{"bytes": (corpus / r["path"]).read_bytes(), "path": r["id"] + ext[r["id"]]}
                                          for r in part], "text": [r["text"] for r in part]})
        ds.cast_column("audio", Audio()).to_parquet(str(shards / f"test-{k:05d}-of-00002.parquet"))

    stem = lambda fid: os.path.splitext(os.path.basename(fid))[0]
    for name, source in (("folder", folder), ("csv", table), ("nemo", nemo), ("shards", shards / "test-*.parquet")):
        out = tmp / f"out-{name}"
        stats = run(str(source), str(out), settings, progress=False)
        assert stats.output_failed == 0, name
        assert _texts_by_clip(out, stem) == want, name
        refs = {stem(fid): r["reference_text"] for fid, r in _files(out).items()}
        assert refs == {r["id"]: r["text"] for r in clips}, name  # sidecars, columns, NeMo text, dataset text

    # eval against the dataset's own text column
    r = CliRunner().invoke(main, ["eval", str(tmp / "out-shards"), "--format", "json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["overall"]["files"] == len(CLIPS) and report["overall"]["wer"] > 0


def test_plan_reports_the_run_statuses(setup):
    tmp, _, manifest, settings, base_out = setup
    out = tmp / "plan"
    report = plan(str(manifest), str(out), settings, progress=False)
    planned, ran = _files(out), _files(base_out)
    assert planned.keys() == ran.keys()
    for fid, r in ran.items():
        p = planned[fid]
        for col in ("status", "error_kind", "error", "warning", "duration_s", "speech_s", "num_segments"):
            assert p[col] == r[col], (fid, col)
        assert p["text"] is None
    seg = lambda d: sorted((s["file_id"], s["segment_index"], s["start_s"], s["end_s"], s["max_new_tokens"])
                           for s in pads.dataset(d / "segments", format="parquet").to_table().to_pylist())
    assert seg(out) == seg(base_out)
    failed = [r for r in ran.values() if r["status"] != "ok"]
    assert report.files_failed == len(failed) > 0
    assert report.failures_by_kind == {k: sum(1 for r in failed if r["error_kind"] == k)
                                       for k in {r["error_kind"] for r in failed}}
    ok = [r for r in ran.values() if r["status"] == "ok"]
    assert report.audio_s == pytest.approx(sum(r["duration_s"] for r in ok))
    assert report.speech_s == pytest.approx(sum(r["speech_s"] for r in ok))
    assert sum(report.segments_by_token_limit.values()) == report.segments == sum(r["num_segments"] for r in ok)
    assert report.audio_per_task_s > 0
    info = json.loads((out / "plan.json").read_text())
    assert info["files_failed"] == report.files_failed and (out / "_SUCCESS").exists()
    # resumable: the rerun finds every file done; a run is refused into a plan's folder
    again = plan(str(manifest), str(out), settings, progress=False)
    assert again.files == report.files and again.run_audio_s == 0
    from krasr_batch.pipeline import SettingsMismatch

    with pytest.raises(SettingsMismatch):
        run(str(manifest), str(out), settings, progress=False)


def test_dataset_export_round_trips(setup, tmp_path):
    from datasets import Audio, load_dataset

    tmp, _, _, settings, base_out = setup
    where = "file_id in ('ru_000', 'ru_005') and start_s >= 0"
    r = CliRunner().invoke(main, ["export", str(base_out), "--format", "dataset", "--where", where])
    assert r.exit_code == 0, r.output
    shards = sorted(str(p) for p in (base_out / "export" / "dataset").glob("data-*.parquet"))
    assert shards
    ds = load_dataset("parquet", data_files=shards, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(ds.features["audio"], Audio) and ds.features["audio"].sampling_rate == 16000
    segs = {(s["file_id"], s["segment_index"]): s for s in
            pads.dataset(base_out / "segments", format="parquet").to_table().to_pylist()}
    rows = ds.cast_column("audio", Audio(decode=False)).to_list()
    assert sorted(x["file_id"] for x in rows) == ROUND_TRIP
    for x in rows:
        s = segs[(x["file_id"], x["segment_index"])]
        assert (x["text"], x["start_s"], x["end_s"], x["avg_logprob"], x["suspect"]) == (
            s["text"], s["start_s"], s["end_s"], s["avg_logprob"], s["suspect"])
        assert x["duration_s"] == pytest.approx(s["end_s"] - s["start_s"], abs=1e-4)
    bad = CliRunner().invoke(main, ["export", str(base_out), "--format", "dataset", "--where", "no_such_column > 1"])
    assert bad.exit_code == 2 and "--where" in bad.output and "no_such_column" in bad.output

    out = tmp / "round-trip"
    run(str(base_out / "export" / "dataset" / "data-*.parquet"), str(out), settings, progress=False)
    again = _files(out)
    assert {fid: r["text"] for fid, r in again.items()} == {x["audio"]["path"]: x["text"] for x in rows}
