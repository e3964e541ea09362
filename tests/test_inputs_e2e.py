"""The same clips as a JSONL manifest, a folder, a CSV, a NeMo manifest and dataset shards give the same texts;
``plan`` gives the run's statuses; ``export --format dataset`` round-trips through `datasets` and back.

Every command runs as the real ``krasr-batch`` in its own process (tiny-random model), as in the other e2e
modules: Ray never starts in the pytest process, so these tests and the loopback-cluster tests
(test_cluster.py, a token-authenticated Ray) can share one session in either order.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import pyarrow.dataset as pads
import pytest

from .conftest import read_jsonl, run_cli, write_manifest

pytestmark = pytest.mark.e2e  # Ray runs in subprocesses

# wav 16 kHz, flac 44.1 kHz stereo, ogg, mp3, wav 16 kHz: every decoder; the 16 kHz wavs round-trip exactly.
# Russian only: a folder has no per-file language, so every shape decodes with the run's --language russian
CLIPS = ["ru_000", "ru_001", "ru_002", "ru_003", "ru_005"]
ROUND_TRIP = ["ru_000", "ru_005"]


def _files(out) -> dict[str, dict]:
    return {r["file_id"]: r for r in pads.dataset(out / "files", format="parquet").to_table().to_pylist()}


def _run(source, out, model, *extra: str):
    """``krasr-batch run`` as the module's base run did it: one setting for every input shape."""
    return run_cli(["run", str(source), "--out", str(out), "--model", str(model), "--language", "russian",
                    "--flush-s", "0", "--num-cpus", "2", "--no-progress", *extra], timeout=600)


def _plan(source, out, *extra: str):
    return run_cli(["plan", str(source), "--out", str(out), "--language", "russian", "--num-cpus", "2",
                    "--no-progress", *extra], timeout=600)


def _one_error_line(r) -> str:
    """A refused command: exit 2, one ``error: ...`` line on stderr and no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr[-3000:])
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus, tiny_model):
    tmp = tmp_path_factory.mktemp("shapes")
    by_id = {r["id"]: r for r in read_jsonl(corpus / "clips.jsonl")}
    clips = [by_id[i] for i in CLIPS]
    bad = read_jsonl(corpus / "bad.jsonl")
    manifest = write_manifest(tmp / "all.jsonl", clips + bad, base=corpus)
    out = tmp / "jsonl"
    r = _run(manifest, out, tiny_model)
    assert r.returncode == 3, r.stderr[-3000:]  # completed; the bad inputs failed
    assert (out / "_SUCCESS").exists()
    return tmp, clips, bad, manifest, out


def _texts_by_clip(out, key) -> dict[str, str]:
    return {key(fid): r["text"] for fid, r in _files(out).items()}


def test_every_input_shape_gives_the_jsonl_texts(setup, corpus, tiny_model):
    from datasets import Audio, Dataset

    tmp, clips, _, _, base_out = setup
    want = {i: r["text"] for i, r in _files(base_out).items() if i in CLIPS}
    assert all(want.values()) and len(want) == len(CLIPS)
    ext = {r["id"]: os.path.splitext(r["path"])[1] for r in clips}

    folder = tmp / "folder"
    folder.mkdir()
    for r in clips:
        shutil.copy(corpus / r["path"], folder / f"{r['id']}{ext[r['id']]}")
        (folder / f"{r['id']}.txt").write_text(r["text"], encoding="utf-8")
    (folder / "readme.md").write_text("not audio", encoding="utf-8")
    # one reference text saved in cp1251: that file is transcribed all the same, without a reference, and
    # says why in its row (the run is not stopped by it)
    legacy = clips[-1]["id"]
    (folder / f"{legacy}.txt").write_text(clips[-1]["text"], encoding="cp1251")

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

    # a list of paths, as `find` writes it (relative to the list's folder), and a pattern of recordings whose
    # NAME.txt matches are their sidecars, not inputs
    paths = tmp / "files.txt"
    paths.write_text("".join(f"folder/{r['id']}{ext[r['id']]}\n" for r in clips), encoding="utf-8")
    pattern = folder / "ru_*"

    stem = lambda fid: os.path.splitext(os.path.basename(fid))[0]  # noqa: E731
    for name, source in (("folder", folder), ("csv", table), ("nemo", nemo), ("shards", shards / "test-*.parquet"),
                         ("paths", paths), ("pattern", pattern)):
        out = tmp / f"out-{name}"
        r = _run(source, out, tiny_model)
        assert r.returncode == 0, (name, r.stderr[-3000:])  # every file ok
        assert f"krasr-batch: {len(CLIPS)} files in the manifest" in r.stdout, name
        files = _files(out)
        assert all(x["status"] == "ok" for x in files.values()), name
        assert _texts_by_clip(out, stem) == want, name
        refs = {stem(fid): x["reference_text"] for fid, x in files.items()}
        want_refs = {x["id"]: x["text"] for x in clips}  # sidecars, columns, NeMo text, dataset text
        warnings = {stem(fid): x["warning"] for fid, x in files.items() if x["warning"]}
        if name == "paths":
            want_refs = dict.fromkeys(want_refs)  # a list of paths carries no text
        if name in ("folder", "pattern"):
            want_refs[legacy] = None
            sidecar = str(folder / f"{legacy}.txt")
            assert warnings == {legacy: f"sidecar: {sidecar} is not UTF-8 (invalid continuation byte at byte 1), "
                                        "so the file has no reference text (save it as UTF-8: iconv -f cp1251 "
                                        "-t utf-8)"}, name
            assert f"warning (sidecar): 1: {legacy}{ext[legacy]}" in r.stdout  # the summary
            assert sorted(files) == sorted(f"{x['id']}{ext[x['id']]}" for x in clips)  # ids: names
            assert "1 file(s) of the manifest came with a warning" in r.stderr and sidecar in r.stderr  # at once
        else:
            assert warnings == {}, name
        assert refs == want_refs, name

    # eval against the dataset's own text column
    r = run_cli(["eval", str(tmp / "out-shards"), "--format", "json"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["overall"]["files"] == len(CLIPS) and report["overall"]["wer"] > 0


def test_plan_reports_the_run_statuses(setup, tiny_model):
    tmp, clips, bad, manifest, base_out = setup
    out = tmp / "plan"
    r = _plan(manifest, out, "--pass-files", "4")  # in passes of 4 files, one Ray Data execution each
    assert r.returncode == 3, r.stderr[-3000:]  # the plan completed; the bad inputs failed, as in the run
    n = len(clips) + len(bad)
    assert f"krasr-batch plan: {n} files" in r.stdout and "Traceback" not in r.stderr
    planned, ran = _files(out), _files(base_out)
    assert planned.keys() == ran.keys()
    for fid, x in ran.items():
        p = planned[fid]
        for col in ("status", "error_kind", "error", "warning", "duration_s", "speech_s", "num_segments"):
            assert p[col] == x[col], (fid, col)
        assert p["text"] is None
    seg = lambda d: sorted((s["file_id"], s["segment_index"], s["start_s"], s["end_s"], s["max_new_tokens"])  # noqa: E731
                           for s in pads.dataset(d / "segments", format="parquet").to_table().to_pylist())
    assert seg(out) == seg(base_out)

    # the plan's figures, as plan.json writes them, against the run's files
    info = json.loads((out / "plan.json").read_text())
    failed = [x for x in ran.values() if x["status"] != "ok"]
    ok = [x for x in ran.values() if x["status"] == "ok"]
    assert info["files"] == n and info["files_ok"] == len(ok) and info["passes"] == -(-n // 4)
    assert info["files_failed"] == len(failed) > 0
    assert info["failures_by_kind"] == {k: sum(1 for x in failed if x["error_kind"] == k)
                                        for k in {x["error_kind"] for x in failed}}
    for kind, count in info["failures_by_kind"].items():
        assert f"failed ({kind}): {count}" in r.stdout
    assert info["audio_s"] == pytest.approx(sum(x["duration_s"] for x in ok))
    assert info["speech_s"] == pytest.approx(sum(x["speech_s"] for x in ok))
    assert sum(info["segments_by_token_limit"].values()) == info["segments"] == sum(x["num_segments"] for x in ok)
    assert info["audio_per_task_s"] > 0 and info["run_audio_s"] > 0 and info["audio_per_wall_s"] > 0
    assert info["settings"]["segment"] and info["settings"]["token_limit"]
    assert (out / "_SUCCESS").exists()

    # resumable: the rerun finds every file done and decodes nothing
    again = _plan(manifest, out)
    assert again.returncode == 3, again.stderr[-3000:]
    info2 = json.loads((out / "plan.json").read_text())
    assert info2["files"] == info["files"] and info2["segments"] == info["segments"]
    assert info2["run_audio_s"] == 0
    # a run is refused into a plan's folder, in one line, before anything is written
    line = _one_error_line(_run(manifest, out, tiny_model))
    assert "other model or decoding settings" in line and "--overwrite" in line
    assert not (out / "run.json").exists()

    # a table without a path column: one line naming the file and its columns, before any work
    nopath = tmp / "nopath.csv"
    nopath.write_text("file,text\na.wav,x\n", encoding="utf-8")
    line = _one_error_line(_plan(nopath, tmp / "plan-nopath"))
    assert str(nopath) in line and "no 'path' column" in line and "columns: file, text" in line
    assert not (tmp / "plan-nopath" / "files").exists()


def test_dataset_export_round_trips(setup, tmp_path, tiny_model):
    from datasets import Audio, load_dataset

    tmp, _, _, _, base_out = setup
    where = "file_id in ('ru_000', 'ru_005') and start_s >= 0"
    r = run_cli(["export", str(base_out), "--format", "dataset", "--where", where])
    assert r.returncode == 0, r.stderr[-3000:]
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
    line = _one_error_line(run_cli(["export", str(base_out), "--format", "dataset", "--where", "no_such_column > 1"]))
    assert "--where" in line and "no_such_column" in line

    # the exported shards are an input again: the same audio gives the same texts
    out = tmp / "round-trip"
    r = _run(base_out / "export" / "dataset" / "data-*.parquet", out, tiny_model)
    assert r.returncode == 0, r.stderr[-3000:]
    again = _files(out)
    assert {fid: x["text"] for fid, x in again.items()} == {x["audio"]["path"]: x["text"] for x in rows}
