"""Smoke test of the benchmark harness (benchmarks.compare): three clips, the tiny model, a temp BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from benchmarks import compare
from benchmarks.baselines import audio_duration_s
from krasr_batch.engines import max_new_tokens_for

from .conftest import read_jsonl

KRASR, CARD, FW = compare.LABELS["krasr"], compare.LABELS["card"], compare.LABELS["faster-whisper"]
KRASR_TF = compare.LABELS["krasr-tf"]


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """Rows of the first Markdown table in ``text``, keyed by system label, each {column: cell}."""
    lines = [x for x in text.splitlines() if x.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return rows


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One OpenMP thread in every benchmarked command: on a shared 2-core machine two spinning threads make the
    tiny model's many small ops crawl (seconds a clip) whenever another process holds a core."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def harness_args(corpus: Path, model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--corpus", str(corpus), "--model", str(model), "--device", "cpu", "--work", str(tmp_path / "work"),
            *extra]


def test_compare_krasr_and_card_and_refresh_block(corpus, tiny_model, tmp_path, capsys):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nIntro kept as it is.\n", encoding="utf-8")
    write = ["--write", str(bench), "--section", "smoke"]

    assert compare.main(harness_args(corpus, tiny_model, tmp_path, "--limit", "3", "--systems", "krasr,krasr-tf,card",
                                     "--krasr-args", "--engine ctranslate2", *write)) == 0
    rows = parse_table(capsys.readouterr().out)
    assert set(rows) == {KRASR, KRASR_TF, CARD}
    for row in rows.values():
        assert row["files"] == "3"
        assert float(row["RTFx"]) > 0 and float(row["wall s"]) > 0
        assert float(row["WER %"]) >= 0 and float(row["CER %"]) >= 0
    assert rows[KRASR]["vs krasr-batch"] == "1.00×"
    first = bench.read_text(encoding="utf-8")
    assert first.startswith("# Benchmarks\n\nIntro kept as it is.\n")
    assert first.count("<!-- bench:smoke -->") == 1 and first.count("<!-- /bench:smoke -->") == 1
    assert set(parse_table(first.split("<!-- bench:smoke -->")[1])) == {KRASR, KRASR_TF, CARD}
    assert "- command: `python -m benchmarks.compare " in first
    assert f"settings {KRASR}: " in first and "(`--engine ctranslate2`)" in first
    assert f"settings {KRASR_TF}: " in first and "(`--engine ctranslate2 --engine transformers`)" in first

    assert compare.main(harness_args(corpus, tiny_model, tmp_path, "--limit", "1", "--systems", "card",
                                     *write)) == 0
    second = bench.read_text(encoding="utf-8")
    assert second.count("<!-- bench:smoke -->") == 1 and second.count("<!-- /bench:smoke -->") == 1
    assert second.startswith("# Benchmarks\n\nIntro kept as it is.\n")
    refreshed = parse_table(second.split("<!-- bench:smoke -->")[1])
    assert set(refreshed) == {CARD} and refreshed[CARD]["files"] == "1"


def test_write_section_replaces_only_its_block(tmp_path):
    bench = tmp_path / "B.md"
    compare.write_section(bench, "a", "first a")
    compare.write_section(bench, "b", "only b")
    compare.write_section(bench, "a", "second a with \\1 and $1")
    text = bench.read_text(encoding="utf-8")
    assert text == ("<!-- bench:a -->\nsecond a with \\1 and $1\n<!-- /bench:a -->\n\n"
                    "<!-- bench:b -->\nonly b\n<!-- /bench:b -->\n")


def test_steady_mean_drops_start_and_end():
    assert compare.steady_mean([]) is None
    assert compare.steady_mean([0.0] + [50.0] * 8 + [100.0]) == 50.0
    assert compare.steady_mean([10.0, 20.0]) == 15.0


def test_faster_whisper_without_tokenizer_is_skipped_with_reason(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ctx = compare.Context(tmp_path / "m.jsonl", str(model), "cpu", tmp_path, tmp_path / "work", [], False)
    with pytest.raises(compare.Skip, match="tokenizer.json|not installed"):
        compare.prepare("faster-whisper", ctx)
    rows = compare.build_rows(["faster-whisper"], {}, {"faster-whisper": "no tokenizer.json"},
                              [{"id": "a", "duration_s": 2.0}])
    assert rows[0].rtfx is None and rows[0].note == "skipped: no tokenizer.json"
    assert "skipped: no tokenizer.json" in compare.render_table(rows)


@pytest.mark.skipif(importlib.util.find_spec("faster_whisper") is None, reason="faster-whisper not installed")
def test_compare_faster_whisper_row(corpus, tiny_model, tmp_path, capsys):
    assert compare.main(harness_args(corpus, tiny_model, tmp_path, "--limit", "2", "--systems",
                                     "faster-whisper")) == 0
    row = parse_table(capsys.readouterr().out)[FW]
    assert float(row["RTFx"]) > 0 and float(row["WER %"]) >= 0, row
    assert any((tmp_path / "work" / "ct2").glob("*/model.bin"))


@pytest.mark.skipif(importlib.util.find_spec("faster_whisper") is None, reason="faster-whisper not installed")
def test_the_faster_whisper_row_decodes_up_to_the_cards_limit(corpus, tiny_model):
    """faster-whisper's max_new_tokens=40 stops CTranslate2 after 22 tokens (max_length // 2): the peer row gets
    the max_new_tokens that makes the card's 40 effective. Random weights never end a transcript early."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from benchmarks.baselines import faster_whisper_max_new_tokens
    from krasr_batch.engines.ctranslate2 import converted_model

    clip = read_jsonl(corpus / "clips.jsonl")[0]
    assert max_new_tokens_for(audio_duration_s(str(corpus / clip["path"]))) == 40
    pipe = BatchedInferencePipeline(WhisperModel(str(converted_model(str(tiny_model))), device="cpu",
                                                 compute_type="float32", cpu_threads=1))

    def tokens(max_new_tokens: int) -> int:
        segments, _ = pipe.transcribe(str(corpus / clip["path"]), language="kk", beam_size=3, no_repeat_ngram_size=4,
                                      repetition_penalty=1.12, without_timestamps=True,
                                      condition_on_previous_text=False, max_new_tokens=max_new_tokens, batch_size=16)
        return sum(len(s.tokens) for s in segments)

    assert tokens(40) == 22  # what the peer row ran with before: about half the card's limit
    assert tokens(faster_whisper_max_new_tokens(40)) == 40


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(corpus, tiny_model, tmp_path):
    """The one GPU check (benchmarks.gpu_check), run as its dry run: --device cpu --quick, tiny-random built from the
    carried config and tokenizer files, three clips and one long recording prepared as the device run gets them."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    data, out = tmp_path / "data", tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    prep = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "prepare", "--corpus", str(corpus),
                           "--data", str(data), "--model-files", str(tiny_model), "--clips", "3", "--long", "1"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    assert not list((data / "model").glob("*.safetensors"))  # config and tokenizer only: no weights travel
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--data",
                          str(data), "--out", str(out), "--work", str(tmp_path / "work"), "--workers", "1",
                          "--budget-s", "3000"],  # a busy CI machine must not skip sections for time
                         cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert doc["finished"] and doc["model_name"] == "tiny-random" and doc["info"]["device"] == "cpu"
    sections = doc["sections"]
    assert set(sections) == {"a", "b", "c", "d", "compile"}
    for name, sec in sections.items():
        assert sec["status"] == "done" or (sec["status"] == "skipped" and sec["reason"]), (name, sec)
    for key in ("float16_batch1_vs_batchB", "float32_device_vs_cpu", "float16_batchB_device_vs_host_search",
                "float32_device_vs_host_search", "float16_batchB_graphed_vs_host_search",
                "float32_graphed_vs_host_search"):
        r = sections["a"][key]
        assert 0 <= r["equal_text"] <= r["segments"] and r["segments"] > 0, r
    for search in ("device", "graphed"):  # float32: the searches choose the same
        r = sections["a"][f"float32_{search}_vs_host_search"]
        assert r["equal_text"] == r["segments"], r
    runs = sections["b"]["runs"]
    # both engines side by side (torch: GPUs' default; on the CPU its float16 rows run in bfloat16)
    assert {(r["engine"], r["dtype"], r["batch"]) for r in runs} >= {
        ("torch-graphed", "float16", 4), ("torch-device", "float16", 4), ("torch", "float16", 4),
        ("transformers", "float16", 4),
        ("torch", "bfloat16", 4)}
    for r in runs:
        assert r["status"] == "done" and r["rtfx"] > 0 and r["segments"] == 4, r
        assert len(r["pass_walls_s"]) == 2 and r["wall_s"] == min(r["pass_walls_s"]), r
    assert any(r["no_repeat_ngram_size"] == 0 for r in runs)  # the diagnostic run
    assert all(r["no_repeat_ngram_s"] >= 0 for r in runs if r["no_repeat_ngram_size"] and r["engine"] == "transformers")
    assert sections["b"]["best"]["rtfx"] > 0
    assert sections["compile"]["runs"][0]["rtfx"] > 0 and sections["compile"]["runs"][0]["cache"] == "static"
    rows = {r["system"].split(" (")[0]: r for r in sections["c"]["rows"]}
    assert set(rows) == {"krasr-batch", "card pipeline", "chunked pipeline", "faster-whisper"}
    assert {r["system"] for r in sections["c"]["rows"]} >= {"krasr-batch (torch engine, batch 64)",
                                                           "krasr-batch (WhisperDecoder, batch 64)",
                                                           "krasr-batch (torch engine, batch 64, word timestamps)"}
    assert all(r["status"] == "done" for r in sections["c"]["rows"] if r["system"].startswith("krasr-batch"))
    for r in rows.values():
        assert (r["status"] == "done" and r["rtfx"] > 0) or r.get("reason") or r.get("error"), r
    assert sections["d"]["feed_x_realtime"] > 0 and sections["d"]["settings"]["workers"] == 1
    md = (out / "gpu_check.md").read_text(encoding="utf-8")
    for title in ("Correctness", "Model-stage throughput", "Static cache", "Peers", "CPU feed"):
        assert title in md


def test_gpu_check_token_limit_seam():
    """gpu_check's one seam to the token-limit policy: krasr-batch's own (engines.segment_token_limit)."""
    from benchmarks.gpu_check import token_limit
    from krasr_batch.engines import max_new_tokens_for

    for d in (0.5, 3.5, 12.0, 27.0, 30.0):
        assert token_limit(d, True, "card") == token_limit(d, False, "card") == max_new_tokens_for(d)
        assert token_limit(d, True, "fit") == max_new_tokens_for(d)
    assert token_limit(27.0, False, "fit") == 360  # 12 a second of its bucket's edge, 30 s
    assert token_limit(2.0, False, "fit") == 60 > max_new_tokens_for(2.0)  # never below the card's limit


def test_clip_fit_cuts_clips_at_sentence_ends_and_counts_what_the_cards_limit_cuts(corpus, tiny_model, tmp_path,
                                                                                   capsys):
    """benchmarks/clip_fit.py: clips of at most 30 s cut between the corpus's sentence spans, each holding its
    sentences' speech, and the count of references over the card's limit and over the "fit" budget."""
    import json

    import soundfile as sf

    from benchmarks import clip_fit

    clip_fit.main(["make", str(corpus), "--out", str(tmp_path / "clips"), "--seed", "3"])
    made = json.loads(capsys.readouterr().out)
    rows = read_jsonl(tmp_path / "clips" / "clips.jsonl")
    spans = read_jsonl(corpus / "spans.jsonl")
    assert made["clips"] == len(rows) > 4
    assert sum(r["sentences"] for r in rows) == len(spans)  # every sentence in one clip, none split
    for r in rows:
        d = sf.info(tmp_path / "clips" / r["path"]).duration
        assert 0.5 < d <= 30.0 and r["text"]
    clip_fit.main(["fit", str(tmp_path / "clips" / "clips.jsonl"), "--model", str(tiny_model)])
    fit = json.loads(capsys.readouterr().out)
    assert fit["clips"] == len(rows) and fit["over_fit_budget"] == 0 and 0 <= fit["over_card"] <= len(rows)


def test_beam_cost_compares_the_engines_searches(corpus, tiny_model, capsys):
    """benchmarks/beam_cost.py on two windows of a long recording: every system's row, and the torch engine's
    float32 search gives CTranslate2 float32's tokens (random weights: long, repetitive rows)."""
    pytest.importorskip("ctranslate2")
    from benchmarks import beam_cost

    beam_cost.main([str(tiny_model), str(corpus / "long" / "long_00.flac"), "--windows", "2", "--repeat", "1"])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert {"CTranslate2 float32", "CTranslate2 int8", "torch engine float32"} <= set(rows)
    assert rows["CTranslate2 float32"].endswith("| 2 of 2 |")
    assert rows["torch engine float32"].endswith("| 2 of 2 |")  # 360 tokens each, all CTranslate2's


def test_encoder_cost_times_each_encoder_and_puts_the_attention_back(corpus, tiny_model, capsys):
    """benchmarks/encoder_cost.py on two windows: a row for each encoder, the flash-attention row as close to
    CTranslate2 float32 as the torch bfloat16 row, and engines.encoder.attention its own again afterwards."""
    pytest.importorskip("ctranslate2")
    from benchmarks import encoder_cost
    from krasr_batch.engines import encoder

    ours = encoder.attention
    encoder_cost.main([str(tiny_model), str(corpus / "long" / "long_00.flac"), "--windows", "2", "--repeat", "1"])
    assert encoder.attention is ours
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| encoder")}
    assert set(rows) == {"CTranslate2 int8", "CTranslate2 float32", "torch float32", "torch bfloat16",
                         "torch bfloat16, flash-attention kernel"}
    diff = {name: float(row[3].rstrip(" |%")) for name, row in rows.items()}
    assert diff["torch float32"] < 0.1
    assert diff["torch bfloat16"] < 2 * diff["torch bfloat16, flash-attention kernel"] + 0.5, diff


def test_encoder_agreement_counts_float32s_next_tokens(corpus, tiny_model, capsys):
    """benchmarks/encoder_agreement.py on two clips and one window: a row for each bfloat16 attention, every
    teacher-forced position counted (at most the limit's 8 a segment), and the attention put back."""
    from benchmarks import encoder_agreement
    from krasr_batch.engines import encoder

    ours = encoder.attention
    encoder_agreement.main([str(tiny_model), str(corpus), str(corpus / "long" / "long_00.flac"), "--clips", "2",
                            "--windows", "1", "--max-new-tokens", "8", "--threads", "1"])
    assert encoder.attention is ours
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| bfloat16")]
    assert [r[0] for r in rows] == ["| bfloat16, flash-attention kernel", "| bfloat16, two products (default)"]
    for row in rows:
        agree, _, total = row[1].split(" ")[:3]
        assert 0 <= int(agree) <= int(total) and 3 <= int(total) <= 3 * 8
        assert float(row[2]) >= 0


def test_replica_memory_reports_one_replicas_peak(corpus, tiny_model, capsys):
    """benchmarks/replica_memory.py on two windows: one row, each peak at least what stays after its phase,
    and the tokens the limit allows (random weights decode to it)."""
    from benchmarks import replica_memory

    replica_memory.main([str(tiny_model), str(corpus / "long" / "long_00.flac"), "--windows", "2", "--limit", "20"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| loaded")][0]
    loaded, load_peak, peak, kept, _, _, tokens = (float(x) for x in row.strip("| ").split(" | "))
    assert 0 < loaded <= load_peak and 0 < kept <= peak
    assert 2 <= tokens <= 40


def test_cpu_by_process_counts_the_command_and_its_children(tmp_path):
    """benchmarks/cpu_by_process.py: a command that starts a busy child shows both, the child's CPU seconds
    included; the exit status is the command's."""
    import sys

    from benchmarks import cpu_by_process

    out = tmp_path / "cpu.txt"
    child = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.6: pass')"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}]); sys.exit(3)"
    assert cpu_by_process.main([str(out), "--", sys.executable, "-c", code]) == 3
    head, *rows = out.read_text().splitlines()
    assert head.startswith("wall ") and head.endswith("exit status 3")
    busy = [r for r in rows if "process_time" in r and "subprocess.run" not in r]  # the child, not its parent
    assert len(busy) == 1 and float(busy[0].split("cpu")[1].split()[0]) >= 0.5, rows
    assert len(rows) <= 2 and all(f"{sys.executable} -c import" in r for r in rows), rows  # its own, nothing else


def test_quiet_compares_each_level_as_it_is_and_raised(corpus, tiny_model, tmp_path, capsys):
    """benchmarks/quiet.py on the Russian clips at their own level and 50 dB down: at their own level both
    rows are the same plan; 50 dB down the VAD finds far less speech as it is than raised, and raised finds
    what it finds at the clips' own level."""
    import json

    from benchmarks import quiet

    out = tmp_path / "quiet.json"
    assert quiet.main(["--corpus", str(corpus), "--model", str(tiny_model), "--levels", "0,-50",
                       "--json", str(out)]) == 0
    rows = {(r["level_db"], r["input"]): r for r in json.loads(out.read_text())["rows"]}
    own, own_raised = rows[0.0, "as it is"], rows[0.0, "raised"]
    assert own_raised["gain_db"] == 0.0 and own_raised["speech_s"] == own["speech_s"]
    assert own_raised["windows"] == own["windows"] == own["clips"] == 20
    quiet_as_is, quiet_raised = rows[-50.0, "as it is"], rows[-50.0, "raised"]
    assert quiet_raised["gain_db"] > 40 and quiet_as_is["gain_db"] == 0.0
    assert quiet_as_is["speech_s"] < 0.5 * own["speech_s"]
    assert abs(quiet_raised["speech_s"] - own["speech_s"]) < 0.05 * own["speech_s"]
    assert "| -50 dB | raised |" in capsys.readouterr().out
