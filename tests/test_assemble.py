"""The driver's assembly and the model stage on small Arrow tables, without Ray: what a committed file is."""

from __future__ import annotations

import io
import json
import os
import platform
import random

import numpy as np
import pyarrow as pa
import pytest

from krasr_batch.engines.encoder import cpu_has_bf16_matmul
from krasr_batch.manifest import ManifestSummary
from krasr_batch.pipeline import RunAborted
from krasr_batch.pipeline.assemble import Assembler, RunStats, check_failures
from krasr_batch.pipeline.stages import ModelStage
from krasr_batch.schema import FILE_ROW, FILES_BASE_SCHEMA, SEGMENTS_SCHEMA, STAGE_SCHEMA, WORDS_SCHEMA, files_schema
from krasr_batch.settings import DecodeOptions

SUMMARY = ManifestSummary(num_files=0, extra_types={"speaker": pa.string(), "take": pa.int64()})


def stage_row(fid: str, index: int, text: str | None = None, num_segments: int = 0, status: str = "ok",
              **over) -> dict:
    """A stage row as the model stage returns it: a segment (index >= 0) or the file row (FILE_ROW)."""
    row = {f.name: None for f in STAGE_SCHEMA}
    row.update(file_id=fid, path=f"/a/{fid}.wav", line=1, req_language="kazakh", reference_text=f"ref {fid}",
               extra_json=json.dumps({"speaker": "s1", "take": 2}), status=status, duration_s=40.0,
               speech_s=30.0, num_segments=num_segments, segment_wall_s=0.0, segment_index=index,
               start_s=float(max(index, 0) * 10), end_s=float(max(index, 0) * 10 + 10), max_new_tokens=120,
               num_tokens=5, truncated=False, decode_s=0.5, batch_size=2, worker="w", text=text, language="kk",
               suspect=False)
    if index == FILE_ROW:
        row.update(segment_wall_s=1.5, text=None, language=None)
    row.update(over)
    return row


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def assembler() -> Assembler:
    return Assembler(SUMMARY, RunStats())


def test_a_file_is_handed_over_only_once_all_its_segments_are_in():
    asm = assembler()
    asm.add(table([stage_row("a", FILE_ROW, num_segments=3), stage_row("a", 2, "three")]))
    assert asm.take() == ([], [], [])
    asm.add(table([stage_row("a", 0, "one")]))
    assert asm.take() == ([], [], []) and asm.pending == 2
    asm.add(table([stage_row("a", 1, "two")]))
    segments, files, _ = asm.take()
    assert [s["segment_index"] for s in segments] == [0, 1, 2] and len(files) == 1
    assert asm.pending == 0 and asm.take() == ([], [], [])


def test_segments_that_come_before_their_file_row_wait_for_it():
    asm = assembler()
    asm.add(table([stage_row("a", 0, "one"), stage_row("a", 1, "two")]))
    assert asm.take() == ([], [], []) and asm.pending == 1
    asm.add(table([stage_row("a", FILE_ROW, num_segments=2)]))
    assert len(asm.take()[1]) == 1


def test_segments_in_any_order_come_out_in_order_and_the_text_joins_them():
    rows = [stage_row("a", i, f"w{i}") for i in range(6)] + [stage_row("a", FILE_ROW, num_segments=6)]
    rows[2]["text"] = ""  # an empty segment adds no double space
    random.Random(3).shuffle(rows)
    asm = assembler()
    for r in rows:
        asm.add(table([r]))
    segments, files, _ = asm.take()
    assert [s["segment_index"] for s in segments] == list(range(6))
    assert files[0]["text"] == "w0 w1 w3 w4 w5"


def test_rows_of_several_files_interleaved_each_file_whole():
    asm = assembler()
    asm.add(table([stage_row("a", 0, "a0"), stage_row("b", 1, "b1"), stage_row("b", FILE_ROW, num_segments=2)]))
    assert asm.take() == ([], [], [])
    asm.add(table([stage_row("a", FILE_ROW, num_segments=1), stage_row("b", 0, "b0")]))
    segments, files, _ = asm.take()
    assert [f["file_id"] for f in files] == ["a", "b"]
    assert [(s["file_id"], s["segment_index"]) for s in segments] == [("a", 0), ("b", 0), ("b", 1)]


def test_rows_are_the_output_tables_shapes():
    asm = assembler()
    asm.add(table([stage_row("a", 0, "hi"), stage_row("a", FILE_ROW, num_segments=1)]))
    segments, files, _ = asm.take()
    assert list(segments[0]) == SEGMENTS_SCHEMA.names
    assert list(files[0]) == files_schema(SUMMARY.extra_schema()).names
    assert segments[0]["language"] == "kk"  # the language decoded with ...
    assert files[0]["language"] == "kazakh"  # ... and the one asked for
    assert (files[0]["speaker"], files[0]["take"], files[0]["reference_text"]) == ("s1", 2, "ref a")
    assert files[0]["segment_wall_s"] == 1.5 and files[0]["num_segments"] == 1
    pa.Table.from_pylist(segments, schema=SEGMENTS_SCHEMA)  # they write as they are
    pa.Table.from_pylist(files, schema=files_schema(SUMMARY.extra_schema()))


def test_words_come_out_with_their_file_and_seconds_by_language_are_summed():
    def words(index, *texts):
        return [{"word": f" {t}", "start_s": index * 10 + k, "end_s": index * 10 + k + 0.5, "probability": 0.5}
                for k, t in enumerate(texts)]

    asm = assembler()
    asm.add(table([stage_row("a", 1, "c", language="ru", words=words(1, "c")),
                   stage_row("a", 0, "a b", words=words(0, "a", "b")),
                   stage_row("a", 2, "", language="en", words=[]),  # no text: no words, no seconds
                   stage_row("b", 0, "x", words=words(0, "x"))]))
    assert asm.take() == ([], [], [])
    asm.add(table([stage_row("a", FILE_ROW, num_segments=3)]))
    segments, files, word_rows = asm.take()
    assert [(w["segment_index"], w["word_index"], w["word"]) for w in word_rows] == [(0, 0, " a"), (0, 1, " b"), (1, 0, " c")]
    assert list(word_rows[0]) == WORDS_SCHEMA.names
    pa.Table.from_pylist(word_rows, schema=WORDS_SCHEMA)
    assert files[0]["language_s"] == {"kk": 10.0, "ru": 10.0}
    assert "words" not in segments[0]
    asm.add(table([stage_row("b", FILE_ROW, num_segments=1)]))
    assert [w["file_id"] for w in asm.take()[2]] == ["b"]


def test_a_failed_file_has_no_text_and_is_counted_by_kind():
    asm = assembler()
    asm.add(table([stage_row("bad", FILE_ROW, status="error", error="no such file", error_kind="not_found"),
                   stage_row("odd", FILE_ROW, status="error", error="?"),
                   stage_row("ok", 0, "fine", truncated=True, truncation="did_not_fit", suspect=True),
                   stage_row("ok", FILE_ROW, num_segments=1)]))
    _, files, _ = asm.take()
    by_id = {f["file_id"]: f for f in files}
    assert by_id["bad"]["text"] is None and by_id["bad"]["error_kind"] == "not_found"
    st = asm.stats
    assert (st.files_done, st.files_ok, st.files_failed) == (3, 1, 2)
    assert st.failures_by_kind == {"not_found": ["bad"], "error": ["odd"]}
    assert (st.segments, st.truncated_segments, st.suspect_segments) == (1, 1, 1)
    assert st.truncated_by_cause == {"did_not_fit": 1} and st.audio_s == 40.0 and st.decode_s == 0.5


@pytest.mark.parametrize("policy", ["fit", "card", "none"])
def test_clips_that_went_on_past_the_cards_limit_are_counted(policy):
    """A file decoded whole at the "fit" budget of its length, above the card's limit, went on (Decoder.decode,
    under "fit"): counted. Whole files at their policy's limit, and windows of a longer recording, are not."""
    from krasr_batch.engines import segment_token_limit

    whole = dict(start_s=0.0, end_s=12.0, duration_s=12.0, audio_s=12.0)  # the card's 80 tokens, the budget 180
    rows = [stage_row("kept", FILE_ROW, num_segments=1, **whole),
            stage_row("kept", 0, "x", max_new_tokens=segment_token_limit(12.0, True, policy), **whole),
            stage_row("long", FILE_ROW, num_segments=2, duration_s=40.0),
            stage_row("long", 0, "x", max_new_tokens=segment_token_limit(10.0, False, policy), audio_s=10.0),
            stage_row("long", 1, "x", max_new_tokens=segment_token_limit(10.0, False, policy), audio_s=10.0),
            # a longer recording with one stretch of speech: one window, not the whole file, at a window's limit
            stage_row("one", FILE_ROW, num_segments=1, duration_s=40.0),
            stage_row("one", 0, "x", max_new_tokens=segment_token_limit(12.0, False, policy), start_s=5.0,
                      end_s=17.0, audio_s=12.0)]
    if policy == "fit":
        rows += [stage_row("went", FILE_ROW, num_segments=1, **whole),
                 stage_row("went", 0, "x", max_new_tokens=180, num_tokens=95, **whole)]
    asm = Assembler(SUMMARY, RunStats())
    asm.add(table(rows))
    assert asm.stats.files_done == 3 + (policy == "fit") and asm.stats.clips_past_card_limit == (policy == "fit")


def test_too_many_failures_stop_the_run_only_past_the_minimum():
    st = RunStats(files_done=9, files_failed=5, failures_by_kind={"not_found": ["a"] * 5})
    check_failures(st, 0.1, 10)  # not enough files yet
    st.files_done = 10
    with pytest.raises(RunAborted, match="not_found: 5"):
        check_failures(st, 0.1, 10)
    check_failures(RunStats(files_done=10, files_failed=1), 0.1, 10)  # exactly the fraction is allowed


def test_files_rows_take_every_base_column_from_the_stage_row():
    # text and language_s are made from the file's segments, language from req_language
    assert set(FILES_BASE_SCHEMA.names) - {"text", "language", "language_s"} <= set(STAGE_SCHEMA.names)
    assert set(SEGMENTS_SCHEMA.names) <= set(STAGE_SCHEMA.names)


# ---------------------------------------------------------------- the model stage

def input_rows(durations: list[float]) -> pa.Table:
    """What segment_file yields for one file: its segments with audio, then the file row."""
    rng = np.random.default_rng(0)
    rows, start = [], 0.0
    for i, d in enumerate(durations):
        audio = rng.normal(0, 0.1, int(16000 * d)).astype(np.float32).tobytes()
        rows.append({**stage_row("f", i), "start_s": start, "end_s": start + d, "max_new_tokens": 8 + i,
                     "audio": audio})
        start += d
    rows.append({**stage_row("f", FILE_ROW, num_segments=len(durations)), "max_new_tokens": 0, "audio": b""})
    keep = [n for n in STAGE_SCHEMA.names if n not in ("text", "language", "num_tokens", "truncated", "decode_s",
                                                       "batch_size", "worker", "avg_logprob", "compression_ratio",
                                                       "no_speech_prob", "suspect", "truncation")]
    return pa.Table.from_pylist([{k: r[k] for k in [*keep, "audio"]} for r in rows])


@pytest.mark.parametrize("engine, dtype, label", [("transformers", "float32", "transformers/float32"),
                                                   ("torch", "float32", "torch/float32"),
                                                   ("ctranslate2", "int8", "ctranslate2/int8")])
def test_every_segment_names_the_engine_and_precision_its_replica_resolved(tiny_model, engine, dtype, label):
    """``--dtype auto`` resolves per node (bfloat16 where the CPU has the units): the worker column says which."""
    stage = ModelStage(DecodeOptions(model=str(tiny_model), beams=1, engine=engine, dtype=dtype), device="cpu")
    host, pid, device, what = stage.worker.split(":")
    assert (int(pid), device, what) == (os.getpid(), "cpu", label)
    auto = ModelStage(DecodeOptions(model=str(tiny_model), beams=1, engine="torch"), device="cpu")
    assert auto.worker.endswith("torch/bfloat16" if cpu_has_bf16_matmul() else "torch/float32")
    assert {r["worker"] for r in stage(input_rows([1.0])).to_pylist()} == {stage.worker}


def test_model_stage_fills_every_segment_and_leaves_the_file_row(tiny_model):
    stage = ModelStage(DecodeOptions(model=str(tiny_model), beams=1, batch_size=2), device="cpu")
    out = stage(input_rows([1.0, 2.0, 1.5]))
    assert out.schema == STAGE_SCHEMA
    rows = out.to_pylist()
    segs, file_row = rows[:3], rows[3]
    for i, s in enumerate(segs):
        assert s["text"] is not None and s["language"] == "kk" and s["worker"] == stage.worker
        assert 0 <= s["num_tokens"] <= s["max_new_tokens"] == 8 + i  # the limit segment_file set is kept
        assert s["truncated"] == (s["num_tokens"] >= s["max_new_tokens"])
        assert s["suspect"] is not None and s["compression_ratio"] is not None and s["batch_size"] >= 1
    assert file_row["segment_index"] == FILE_ROW and file_row["text"] is None and file_row["num_tokens"] == 0
    assert file_row["num_segments"] == 3 and file_row["reference_text"] == "ref f"


def test_model_stage_passes_a_batch_of_file_rows_through(tiny_model):
    stage = ModelStage(DecodeOptions(model=str(tiny_model), beams=1), device="cpu")
    out = stage(input_rows([]))
    assert out.num_rows == 1 and out.to_pylist()[0]["text"] is None


def test_segment_file_rows_are_the_stage_rows_less_the_models_columns(corpus):
    from krasr_batch.pipeline.stages import segment_file
    from krasr_batch.schema import MODEL_OUTPUT_NAMES
    from krasr_batch.settings import SegmentOptions

    row = {"file_id": "c", "path": str(corpus / "clips" / sorted((corpus / "clips").iterdir())[0].name),
           "line": 1, "language": None, "reference_text": None, "extra_json": None}
    rows = list(segment_file(row, SegmentOptions(), "kazakh", None, "fit"))
    expected = (set(STAGE_SCHEMA.names) - set(MODEL_OUTPUT_NAMES)) | {"audio", "stretches", "speech"}  # for word times
    assert all(set(r) == expected for r in rows)
    assert rows[-1]["segment_index"] == FILE_ROW and rows[-1]["status"] == "ok"
    assert [r["segment_index"] for r in rows[:-1]] == list(range(rows[-1]["num_segments"]))


@pytest.mark.parametrize("size", [1, 3, 7, 10, 11, 50])
def test_passes_cut_the_manifest_in_order_and_whole(size):
    """A run goes through a large manifest in passes of at most --pass-files files: every file in one
    pass, in manifest order, and a pass's rows copied out of their row group (only they are shipped)."""
    from krasr_batch.pipeline.orchestrate import _passes

    groups = [pa.table({"file_id": [f"f{i}" for i in range(a, b)]}) for a, b in ((0, 10), (10, 13), (13, 30))]
    passes = list(_passes(groups, size))
    ids = [i for w in passes for g in w for i in g.column("file_id").to_pylist()]
    assert ids == [f"f{i}" for i in range(30)]
    sizes = [sum(g.num_rows for g in w) for w in passes]
    assert all(s == size for s in sizes[:-1]) and 0 < sizes[-1] <= size
    for w in passes:
        for g in w:
            source = next(whole for whole in groups if g.column("file_id")[0] in whole.column("file_id"))
            # a zero-copy slice would count (and ship) the whole group's buffers
            assert g is source or g.get_total_buffer_size() < source.get_total_buffer_size()
    assert list(_passes(groups, 50)) == [groups] and list(_passes([], 5)) == []


ARENAS_PROBE = """
import ctypes, os, sys, tempfile, threading
from krasr_batch.pipeline.orchestrate import limit_malloc_arenas
print(limit_malloc_arenas() if sys.argv[1] == "limit" else None)
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
barrier, keep = threading.Barrier(8), []
def work():  # each thread allocates, as the driver's do, then waits for the others
    keep.append([bytearray(200_000) for _ in range(4)] + [bytes(i) for i in range(1_000)])
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
fd, path = tempfile.mkstemp()
os.close(fd)
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
print(open(path).read().count("<heap nr="))  # glibc's arenas, one <heap> each
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc arenas")
def test_the_driver_keeps_to_two_malloc_arenas():
    """Threads that allocate get arenas of their own (up to 8 a core), and what one frees only its threads
    reuse: the driver grew with every pass. run() and plan() call limit_malloc_arenas first."""
    import subprocess
    import sys

    def probe(mode: str, **env) -> tuple[str, int]:
        r = subprocess.run([sys.executable, "-c", ARENAS_PROBE, mode], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env)
        assert r.returncode == 0, r.stderr
        said, heaps = r.stdout.split()
        return said, int(heaps)

    assert probe("limit") == ("True", 2)
    assert probe("none")[1] > 2  # glibc's default, what the limit changes
    said, heaps = probe("limit", MALLOC_ARENA_MAX="4")  # the user's own setting wins
    assert said == "False" and 2 < heaps <= 4


def test_the_progress_line_names_the_pass_when_there_are_several():
    from krasr_batch.pipeline.assemble import Progress

    stats = RunStats(total_files=120_000, files_done=60_000, passes=2, passes_planned=3)
    assert Progress(stats, True, io.StringIO()).line().split("  ")[-1] == "pass 2/3"
    stats.passes_planned = stats.passes = 1  # one pass: nothing to say
    assert "pass" not in Progress(stats, True, io.StringIO()).line()


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_writes_a_line_every_30_s_to_a_log_and_every_2_s_to_a_terminal(monkeypatch):
    """A multi-day job's log gets a line every 30 s (2,880 a day, not 43,200), and one at once when the run
    has news (a stall named, the next pass); a terminal's line is rewritten every 2 s; --progress-every sets
    both."""
    from krasr_batch.pipeline import assemble

    clock = [1000.0]
    monkeypatch.setattr(assemble.time, "perf_counter", lambda: clock[0])

    def lines(tty: bool, every_s=None, notice_at=None, pass_at=None) -> list[float]:
        stats = RunStats(total_files=10, passes=1, passes_planned=2)
        stream = _Stream(tty)
        prog = assemble.Progress(stats, True, stream, every_s)
        shown = []
        for t in range(0, 121):  # the drain loop calls update() far more often than once a second
            clock[0] = 1000.0 + t
            prog.notice = f"STALLED {t - notice_at} s" if notice_at is not None and notice_at <= t < notice_at + 50 else None
            stats.passes = 2 if pass_at is not None and t >= pass_at else 1
            before = stream.tell()
            prog.update()
            if stream.tell() != before:
                shown.append(t)
        return shown

    assert lines(tty=False) == [0, 30, 60, 90, 120]
    assert lines(tty=True) == list(range(0, 121, 2))
    assert lines(tty=False, every_s=45) == [0, 45, 90]
    assert lines(tty=True, every_s=45) == [0, 45, 90]
    assert lines(tty=False, notice_at=41) == [0, 30, 41, 71, 91]  # the stall at once (its clock is no news), its end
    assert lines(tty=False, pass_at=50) == [0, 30, 50, 80, 110]  # the next pass, at once
    assert lines(tty=True, notice_at=41) == list(range(0, 121, 2))  # a terminal's line is never far behind


@pytest.mark.parametrize("asked, default, stored", [
    (" Russian ", "kazakh", "ru"), (None, "kazakh", "kk"), ("<|kk|>", "auto", "kk"), ("Auto", "kazakh", "auto"),
    (None, "auto", "auto"),
])
def test_a_files_requested_language_is_its_whisper_code_however_spelled(corpus, asked, default, stored):
    """What the engines take and files.language holds. Before: a manifest's "Auto" passed validation, was
    handed to the replica as a language and failed its batch, stopping the whole run; "Russian" and
    "russian" were two values of files.language."""
    from krasr_batch.pipeline.stages import segment_file
    from krasr_batch.settings import SegmentOptions

    row = {"file_id": "c", "path": str(sorted((corpus / "clips").glob("*.wav"))[0]),
           "line": 1, "language": asked, "reference_text": None, "extra_json": None}
    rows = list(segment_file(row, SegmentOptions(), default, None, "fit", cut_audio=False))
    assert {r["req_language"] for r in rows} == {stored}
