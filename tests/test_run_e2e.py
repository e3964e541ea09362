"""The whole command, manifest to Parquet, over the corpus's clips, long recordings and bad inputs."""

import json

import duckdb
import pyarrow.dataset as pads
import pytest

from krasr_batch.engines import choose_engine, max_new_tokens_for, segment_token_limit
from krasr_batch.output import warnings_by_kind
from krasr_batch.quality import truncation_cause

from .conftest import read_jsonl, run_cli, write_manifest

pytestmark = pytest.mark.e2e  # Ray runs in subprocesses


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, corpus, tiny_model):
    tmp = tmp_path_factory.mktemp("e2e")
    rows = read_jsonl(corpus / "clips.jsonl") + read_jsonl(corpus / "long.jsonl") + read_jsonl(corpus / "bad.jsonl")
    manifest = write_manifest(tmp / "all.jsonl", rows, base=corpus)
    out = tmp / "out"
    # --stall-timeout 120: a stage that cannot be placed on this 2-CPU Ray (a task asking for a whole CPU
    # beside the model actors) fails the run in two minutes instead of waiting for the default ten
    r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--num-cpus", "2",
                 "--stall-timeout", "120"])
    return manifest, out, rows, r


def test_exit_status_and_summary(corpus_run):
    _, out, rows, r = corpus_run
    assert r.returncode == 3, r.stderr[-3000:]  # completed, with failed files
    assert "Traceback" not in r.stdout
    assert f"krasr-batch: {len(rows)} files in the manifest" in r.stdout
    assert "failed (undecodable): 2" in r.stdout
    assert "warning (nonfinite): 1: nan_samples.wav" in r.stdout  # ok files with a warning, by its kind
    # the segment line's counts are the segments table's, each under its own name
    seg = duckdb.connect().execute(
        f"select count(*), count(*) filter (truncated), count(*) filter (truncation = 'repetition'), "
        f"count(*) filter (truncation = 'did_not_fit'), count(*) filter (suspect) "
        f"from '{out}/segments/*.parquet'").fetchone()
    n, cut, loops, unfit, suspect = seg
    cut_text = (f"{cut} stopped at the token limit ({loops} repetition loops, {unfit} did not fit)" if cut
                else "none stopped at the token limit")
    files = pads.dataset(out / "files", format="parquet").to_table().to_pylist()
    # clips that went on past the card's limit: a file decoded whole, its one segment at another limit
    durations = {f["file_id"]: f["duration_s"] for f in files if f["num_segments"] == 1}
    went_on = sum(1 for s in pads.dataset(out / "segments").to_table().to_pylist() if s["file_id"] in durations
                  and s["start_s"] == 0.0 and abs(s["end_s"] - durations[s["file_id"]]) < 1e-6
                  and s["max_new_tokens"] != segment_token_limit(s["audio_s"], True, "fit"))
    went_text = (f"{went_on} {'clip' if went_on == 1 else 'clips'} that the card's limit cut short went on to the "
                 "fit budget; ") if went_on else ""
    assert f"; {n} segments: {cut_text}; {went_text}{suspect} suspect by the quality signals\n" in r.stdout
    assert (out / "_SUCCESS").exists()
    info = json.loads((out / "run.json").read_text())
    assert info["counts"]["files"] == len(rows)
    assert info["counts"]["clips_past_card_limit"] == went_on
    assert info["counts"]["warnings_by_kind"] == {k: len(v) for k, v in warnings_by_kind(files).items()}
    assert info["counts"]["warnings_by_kind"]["nonfinite"] == 1
    assert info["settings"]["decode"]["beams"] == 3 and info["settings"]["decode"]["language"] == "kazakh"
    assert info["settings"]["decode"]["repetition_penalty"] == 1.12
    assert info["audio_s"] > 400 and info["rtfx"] > 0
    assert "transformers" in info["versions"] and "ray" in info["versions"]
    # --engine auto on this CPU (torch with bfloat16 units, else CTranslate2), recorded with the reason
    chosen = choose_engine(use_gpu=False)[0]
    assert chosen in ("torch", "ctranslate2")
    assert info["engine"]["requested"] == "auto" and info["engine"]["chosen"] == chosen and info["engine"]["why"]
    assert info["settings"]["decode"]["engine"] == chosen
    tl = info["profile"]["timeline_s"]
    assert 0 < tl["ray_ready"] <= tl["first_result"] <= tl["last_result"] <= tl["written"] <= info["wall_s"] + 1e-3  # run.json rounds to ms
    assert info["profile"]["model_s"] > 0 and info["profile"]["segment_s"] > 0
    # files with no header to read (the bad inputs) leave the job unbounded: one replica per CPU
    assert info["replicas"] == 2


def test_the_terminal_shows_only_krasr_batch_lines(corpus_run):
    """Ray's own lines (token-authentication notice, core_worker.cc, Ray Data's executor) go to the run's log."""
    _, out, _, r = corpus_run
    foreign = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(("files ", "krasr-batch"))]
    assert foreign == [], foreign[:5]
    logs = list((out / "logs").glob("run-*.log"))
    assert len(logs) == 1 and f"Ray's messages: {logs[0]}" in r.stdout
    assert logs[0].read_text().strip()  # Ray said things: to the log, not the terminal


def test_every_manifest_line_exactly_once(corpus_run):
    _, out, rows, _ = corpus_run
    files = pads.dataset(out / "files", format="parquet").to_table().to_pylist()
    assert sorted(f["file_id"] for f in files) == sorted(r["id"] for r in rows)
    n = duckdb.connect().execute(f"select count(*), count(distinct file_id) from '{out}/files/*.parquet'").fetchone()
    assert n == (len(rows), len(rows))


def test_bad_inputs_get_their_expected_status(corpus_run, corpus):
    _, out, _, _ = corpus_run
    files = {f["file_id"]: f for f in pads.dataset(out / "files", format="parquet").to_table().to_pylist()}
    for b in read_jsonl(corpus / "bad.jsonl"):
        f = files[b["id"]]
        assert f["expect"] == b["expect"]  # manifest fields are carried into the files table
        if b["expect"] == "error":
            assert f["status"] == "error" and f["error"] and f["error_kind"], b
            assert f["text"] is None
        elif b["expect"] == "ok-empty":
            assert f["status"] == "ok" and f["num_segments"] == 0 and f["text"] == "", b
        elif b["expect"] == "ok":
            assert f["status"] == "ok", (b, f["error"])
        else:
            assert f["status"] in ("ok", "error")
    assert files["nan_samples.wav"]["warning"] and "NaN" in files["nan_samples.wav"]["warning"]


def test_segment_rows(corpus_run, corpus):
    _, out, rows, _ = corpus_run
    con = duckdb.connect()
    cur = con.execute(f"select * from '{out}/segments/*.parquet' order by file_id, segment_index")
    cols = [c[0] for c in cur.description]
    segs = cur.fetchall()
    assert cols == ["file_id", "path", "segment_index", "start_s", "end_s", "audio_s", "text", "language",
                    "language_prob", "max_new_tokens",
                    "num_tokens", "truncated", "decode_s", "batch_size", "worker", "avg_logprob",
                    "compression_ratio", "no_speech_prob", "suspect", "truncation"]
    files = {f["file_id"]: f for f in pads.dataset(out / "files", format="parquet").to_table().to_pylist()}
    by_file: dict[str, list[dict]] = {}
    for s in segs:
        d = dict(zip(cols, s))
        by_file.setdefault(d["file_id"], []).append(d)
    for fid, f in files.items():
        mine = by_file.get(fid, [])
        assert len(mine) == f["num_segments"], fid
        assert [s["segment_index"] for s in mine] == list(range(len(mine)))
        for s in mine:
            assert 0 <= s["start_s"] < s["end_s"] <= f["duration_s"] + 1e-6
            assert 0 < s["audio_s"] <= min(30.0, s["end_s"] - s["start_s"]) + 1e-6
            whole = len(mine) == 1 and s["start_s"] == 0.0 and abs(s["end_s"] - f["duration_s"]) < 1e-6
            limit = segment_token_limit(s["audio_s"], whole, "fit")
            if whole and s["max_new_tokens"] != limit:  # a clip its card limit cut, gone on to the budget
                assert s["max_new_tokens"] == segment_token_limit(s["audio_s"], False, "fit"), s
                assert s["num_tokens"] >= limit, s
            else:
                assert s["max_new_tokens"] == limit, s
            assert s["truncation"] == (truncation_cause(s["text"], True) if s["truncated"] else None)
            assert s["decode_s"] > 0 and s["batch_size"] >= 1 and s["worker"]
            assert s["avg_logprob"] is None or s["avg_logprob"] <= 0
            assert 0 <= s["no_speech_prob"] <= 1 and s["compression_ratio"] >= 0 and s["suspect"] in (True, False)
        if f["status"] == "ok":
            assert f["text"] == " ".join(s["text"] for s in mine if s["text"])
    longs = [r["id"] for r in read_jsonl(corpus / "long.jsonl")]
    assert all(files[i]["num_segments"] >= 4 for i in longs)
    # windows skip the middles of long pauses: some span more of the recording than the audio they decode
    assert any(s["end_s"] - s["start_s"] > s["audio_s"] + 1 for i in longs for s in by_file[i])
    assert any(s["max_new_tokens"] > 128 for i in longs for s in by_file[i])  # long windows get the fit budget
    clips = [r["id"] for r in read_jsonl(corpus / "clips.jsonl")]
    # clips keep the card's limits, or get the budget where the card's limit cut real text
    assert all(s["max_new_tokens"] in (40, 64, 80, 96, 112, 128) or s["num_tokens"] >= max_new_tokens_for(s["audio_s"])
               for i in clips for s in by_file.get(i, []))
    langs = {r["id"]: r.get("language") for r in rows}
    assert {s["language"] for s in by_file["ru_000"]} == {"ru"} and langs["ru_000"] == "russian"


def test_rerun_is_a_no_op_and_other_settings_are_refused(corpus_run, tiny_model):
    manifest, out, rows, _ = corpus_run
    before = sorted(p.name for p in (out / "files").iterdir())
    r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(tiny_model)])
    assert r.returncode == 3
    assert f"{len(rows)} already done by an earlier run" in r.stdout
    assert sorted(p.name for p in (out / "files").iterdir()) == before
    r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--beams", "1"])
    assert r.returncode == 2 and "other model or decoding settings" in r.stderr and "--overwrite" in r.stderr


def test_eval_and_inspect_on_the_corpus_run(corpus_run):
    _, out, rows, _ = corpus_run
    r = run_cli(["eval", str(out), "--format", "json"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["groups"]) >= {"kk", "ru", "mixed"}
    with_ref = [x for x in rows if x.get("text")]
    assert report["overall"]["files"] == len(with_ref)
    assert sum(g["files"] for g in report["groups"].values()) == report["overall"]["files"]
    table = run_cli(["eval", str(out)])
    assert table.returncode == 0 and all(k in table.stdout for k in ("kk", "ru", "mixed", "WER"))
    inspect = run_cli(["inspect", str(out)])
    assert inspect.returncode == 0 and "undecodable" in inspect.stdout


@pytest.mark.e2e
def test_a_small_job_starts_only_the_replicas_it_can_keep_busy(tmp_path, corpus, tiny_model):
    """Three clips make one model block: a second replica would cost seconds of CPU to start and get no work."""
    rows = read_jsonl(corpus / "clips.jsonl")[:3]
    manifest = write_manifest(tmp_path / "m.jsonl", rows, base=corpus)
    out = tmp_path / "out"
    r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--num-cpus", "2",
                 "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["replicas"] == 1
    segs = pads.dataset(out / "segments", format="parquet").to_table().to_pylist()
    assert len(segs) == 3 and len({s["worker"] for s in segs}) == 1
