"""The CTranslate2 engine: conversion cache, the card's token limit, signals, and a whole run with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from krasr_batch.audio import load_audio
from krasr_batch.engines import SegmentInput, load_decoder, max_new_tokens_for
from krasr_batch.settings import DecodeOptions, RunSettings

from .conftest import read_jsonl, run_cli, write_manifest

ct2 = pytest.importorskip("ctranslate2")
engine = pytest.importorskip("krasr_batch.engines.ctranslate2")


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KRASR_BATCH_CACHE", str(root))
    return root


def test_max_length_gives_exactly_the_cards_limit(tiny_model):
    """Random weights rarely emit end-of-text, so each row runs to its limit: the limit is the step count."""
    # --token-limit card: under "fit" a clip that random weights run to its limit goes on to the budget
    dec = load_decoder(DecodeOptions(model=str(tiny_model), engine="ctranslate2", token_limit="card"), "cpu", 1)
    rng = np.random.default_rng(1)
    audio = rng.normal(0, 0.1, 16000 * 4).astype(np.float32)
    limits = [1, 2, 3, 7, 40]
    out = dec.decode([SegmentInput(audio, "kazakh", n) for n in limits])
    for o, n in zip(out, limits):
        assert o.num_tokens <= n
        assert o.truncated == (o.num_tokens == n)
    assert sum(o.truncated for o in out) >= 3, [o.num_tokens for o in out]
    assert engine.ct2_max_length(40, 4) == 80 and engine.ct2_max_length(1, 4) == 4


def test_decoder_groups_languages_and_reports_signals(tiny_model):
    dec = load_decoder(DecodeOptions(model=str(tiny_model), engine="ctranslate2", batch_size=2, token_limit="card"),
                       "cpu", 1)
    assert dec.engine == "ctranslate2"  # --dtype auto on a CPU: chosen by the CPU's bfloat16 units
    bf16 = engine.cpu_bf16_encoder("auto", "cpu")
    assert dec.compute_type == ("float32, encoder bfloat16 (torch)" if bf16 else "int8")
    rng = np.random.default_rng(0)
    inputs = [SegmentInput(rng.normal(0, 0.1, 16000 * d).astype(np.float32), lang, max_new_tokens_for(d))
              for d, lang in [(3, "kazakh"), (12, "russian"), (3, "russian"), (3, None), (3, "kazakh")]]
    out = dec.decode(inputs)
    # forced languages share a batch (one prompt per row), limits do not; detection has its own batch
    assert [o.batch_size for o in out] == [2, 1, 2, 1, 1]
    assert [o.language for o in out] == ["kk", "ru", "ru", out[3].language, "kk"]
    assert out[3].language in dec.token_by_code  # detected
    for o in out:
        assert o.avg_logprob is not None and o.avg_logprob <= 0 and 0 <= o.no_speech_prob <= 1
        assert o.decode_s > 0


def test_windows_of_several_budgets_share_a_batch_and_are_cut_at_their_own(tiny_model):
    """Windows cut from long recordings (exact_limit False) decode together up to the largest budget; each
    row is cut at its own. Files decoded whole keep batches of their own limit."""
    dec = load_decoder(DecodeOptions(model=str(tiny_model), engine="ctranslate2", batch_size=8, token_limit="card"),
                       "cpu", 1)
    audio = np.random.default_rng(2).normal(0, 0.1, 16000 * 20).astype(np.float32)
    windows = [SegmentInput(audio, "kazakh", n, exact_limit=False) for n in (6, 12, 30)]
    clips = [SegmentInput(audio, "kazakh", n) for n in (5, 9)]
    out = dec.decode(windows + clips)
    assert [o.batch_size for o in out] == [3, 3, 3, 1, 1]
    for o, x in zip(out, windows + clips):
        assert o.num_tokens <= x.max_new_tokens
    # random weights rarely end a row: the shorter windows ran past their budget and were cut at it
    cut = [o for o, x in zip(out[:2], windows) if o.num_tokens == x.max_new_tokens]
    assert cut and all(o.truncated and o.avg_logprob is None for o in cut)


def test_conversion_is_cached_and_shared_by_concurrent_replicas(tiny_model, own_cache):
    results, errors = [], []

    def convert():
        try:
            results.append(engine.converted_model(str(tiny_model)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    folder = results[0]
    assert (folder / "model.bin").exists() and (folder / "tokenizer.json").exists()
    assert json.loads((folder / "preprocessor_config.json").read_text())["feature_size"] > 0
    assert [p.name for p in (own_cache / "ct2").iterdir() if not p.name.startswith(".")] == [folder.name]
    stamp = (folder / "model.bin").stat().st_mtime_ns
    assert engine.converted_model(str(tiny_model)) == folder
    assert (folder / "model.bin").stat().st_mtime_ns == stamp  # not converted again


def test_changed_checkpoint_is_converted_again(tiny_model, tmp_path, own_cache):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    first = engine.converted_model(str(copy))
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    second = engine.converted_model(str(copy))
    assert first != second and (second / "model.bin").exists()


def test_only_safetensors_are_converted(tiny_model, tmp_path, own_cache):
    model = tmp_path / "no-weights"
    model.mkdir()
    for f in tiny_model.glob("*.json"):
        shutil.copy(f, model)
    with pytest.raises(RuntimeError, match="safetensors"):
        engine.converted_model(str(model))
    assert not list((own_cache / "ct2").glob("*/model.bin")) if (own_cache / "ct2").exists() else True


def test_compute_types():
    # on CPUs: float32 decoding beside a bfloat16 encoder where the CPU has bfloat16 units, else int8 weights
    assert engine.compute_type_for("auto", "cpu") == ("float32" if engine.cpu_bf16_encoder("auto", "cpu") else "int8")
    assert engine.compute_type_for("float32", "cpu") == "float32"
    assert engine.compute_type_for("auto", "cuda") == "float16"
    assert engine.compute_type_for("int8", "cpu") == "int8"
    assert engine.compute_type_for("int8", "cuda") == "int8_float16"
    assert engine.compute_type_for("bfloat16", "cuda") == "bfloat16"


def test_engine_is_part_of_the_output_fingerprint():
    base = RunSettings(decode=DecodeOptions(engine="transformers"))
    other = RunSettings(decode=DecodeOptions(engine="ctranslate2"))
    assert base.output_fingerprint() != other.output_fingerprint()
    # transformers (the default before --engine auto) leaves the fingerprint as it was before engines
    # existed, so older outputs resume
    import dataclasses
    import hashlib

    d = dataclasses.asdict(base.decode)
    d.pop("batch_size")
    d.pop("engine")
    d.pop("word_timestamps")  # off, and --languages unset: not stamped either (issue 14)
    d.pop("languages")
    payload = json.dumps({"decode": d, "segment": dataclasses.asdict(base.segment)}, sort_keys=True)
    assert base.output_fingerprint() == hashlib.sha256(payload.encode()).hexdigest()[:16]
    with pytest.raises(ValueError, match="engine"):
        DecodeOptions(engine="onnx")


@pytest.mark.e2e
@pytest.mark.slow
def test_accuracy_matches_the_transformers_engine(base_model, corpus):
    """The same weights and settings: on real speech the two engines' word error rates stay close, and their
    no-speech probabilities (one decoder step on the same encoder output) agree."""
    import jiwer

    from krasr_batch.textnorm import normalize

    clips = read_jsonl(corpus / "clips.jsonl")[::3][:16]  # Russian, Kazakh and mixed
    inputs = []
    for c in clips:
        audio = load_audio(str(corpus / c["path"]))
        inputs.append(SegmentInput(audio, c["language"], max_new_tokens_for(len(audio) / 16000)))
    ct = load_decoder(DecodeOptions(model=str(base_model), engine="ctranslate2"), "cpu", 2).decode(inputs)
    tf = load_decoder(DecodeOptions(model=str(base_model), engine="transformers"), "cpu", 2).decode(inputs)
    refs = [normalize(c["text"]) for c in clips]
    wer_ct = jiwer.wer(refs, [normalize(o.text) for o in ct])
    wer_tf = jiwer.wer(refs, [normalize(o.text) for o in tf])
    assert abs(wer_ct - wer_tf) < 0.06, (wer_ct, wer_tf)  # measured 0.900 and 0.917
    assert sum(a.text == b.text for a, b in zip(ct, tf)) >= 2  # measured 3 of 16 (6 of the first 16 Russian)
    # Where the CPU has bfloat16 units the CTranslate2 engine's encoder is torch's in bfloat16: against
    # transformers' float32 one these 16 clips measured |difference| at most 0.0106, mean 0.0035 (with PyTorch's
    # flash-attention kernel in the encoder 0.0064 / 0.0032; over all 50 corpus clips 0.0165 / 0.0039 against
    # 0.0111 / 0.0035: BENCHMARKS.md, "The encoder's attention in two products").
    gaps = [abs(a.no_speech_prob - b.no_speech_prob) for a, b in zip(ct, tf)]
    assert max(gaps) < 0.02 and sum(gaps) / len(gaps) < 0.006, gaps
    for a, b in zip(ct, tf):
        assert a.language == b.language
        if a.text == b.text:
            assert a.num_tokens == b.num_tokens and abs(a.avg_logprob - b.avg_logprob) < 0.1


@pytest.mark.e2e
def test_run_with_the_ctranslate2_engine(tmp_path, corpus, tiny_model):
    rows = read_jsonl(corpus / "clips.jsonl")[:3] + read_jsonl(corpus / "bad.jsonl")[:2]
    manifest = write_manifest(tmp_path / "m.jsonl", rows, base=corpus)
    out = tmp_path / "out"
    r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--engine", "ctranslate2",
                 "--num-cpus", "2", "--no-progress"])
    assert r.returncode in (0, 3), r.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["decode"]["engine"] == "ctranslate2" and "ctranslate2" in info["versions"]
    files = pads.dataset(out / "files", format="parquet").to_table().to_pylist()
    assert sorted(f["file_id"] for f in files) == sorted(x["id"] for x in rows)
    segs = pads.dataset(out / "segments", format="parquet").to_table().to_pylist()
    assert segs and all(s["num_tokens"] <= s["max_new_tokens"] and s["avg_logprob"] <= 0 for s in segs)
    # the transformers engine decodes differently: resuming this output with it is refused
    r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--no-progress",
                 "--engine", "transformers"])
    assert r.returncode == 2 and "other model or decoding settings" in r.stderr


@pytest.mark.e2e
def test_a_model_that_cannot_load_stops_before_any_output(tmp_path, corpus, tiny_model):
    manifest = write_manifest(tmp_path / "m.jsonl", read_jsonl(corpus / "clips.jsonl")[:1], base=corpus)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for f in tiny_model.glob("*.json"):
        shutil.copy(f, weightless)
    for model, message in [(tmp_path / "missing", "no such folder"), (weightless, "safetensors")]:
        for eng in ("transformers", "ctranslate2"):
            out = tmp_path / f"out-{model.name}-{eng}"
            r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(model), "--engine", eng])
            assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
            assert not os.path.exists(out)


def test_numpy_features_equal_transformers_feature_extractor(tiny_model):
    from transformers import WhisperFeatureExtractor

    from krasr_batch.engines.base import NumpyLogMel

    rng = np.random.default_rng(3)
    audios = [rng.normal(0, 0.1, n).astype(np.float32) for n in (16000 * 3, 16000 * 29, 16000 * 31)]
    ref = WhisperFeatureExtractor.from_pretrained(tiny_model)(audios, sampling_rate=16000, return_tensors="np")
    mine = NumpyLogMel.from_pretrained(str(tiny_model))(audios, sampling_rate=16000)
    assert mine["input_features"].shape == ref["input_features"].shape
    np.testing.assert_allclose(mine["input_features"], ref["input_features"], atol=2e-5)


@pytest.mark.parametrize("dtype", ["int8", "auto"])
def test_a_ctranslate2_replica_imports_torch_only_for_its_bf16_encoder(tiny_model, dtype):
    """torch's import is about 2 s of every replica's start, transformers' 1.5 to 3 s; the CTranslate2 engine
    needs neither (the model check may use transformers' config reader), except torch where the replica runs
    the encoder in bfloat16 (--dtype auto on a CPU with bfloat16 matrix units: engines/encoder.py)."""
    wants_torch = engine.cpu_bf16_encoder(dtype, "cpu")
    code = ("import sys; from krasr_batch.engines import check_model, load_decoder; "
            "from krasr_batch.settings import DecodeOptions; import numpy as np; "
            f"o = DecodeOptions(model={str(tiny_model)!r}, dtype={dtype!r}, engine='ctranslate2'); "
            f"check_model(DecodeOptions(model={str(tiny_model)!r}, engine='ctranslate2')); "
            "d = load_decoder(o, 'cpu', 1); "
            "from krasr_batch.engines import SegmentInput; "
            "d.decode([SegmentInput(np.zeros(16000, np.float32), 'kazakh', 5)]); "
            f"assert ('torch' in sys.modules) is {wants_torch}, 'torch imported: ' + str('torch' in sys.modules); "
            "import krasr_batch.engines.ctranslate2 as e; sys.modules.pop('transformers', None); "
            "e.CTranslate2Decoder(o, 'cpu', 1); "
            "assert 'transformers' not in sys.modules, 'transformers was imported by the replica'; print(d.engine)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0 and r.stdout.strip() == "ctranslate2", r.stderr[-2000:]


def test_the_replicas_own_tokenizer_and_config_read_as_transformers(tiny_model):
    """krasr_batch.engines.vocab (no transformers) gives the text, special tokens, language table and generation
    config transformers gives, for ordinary, special, prompt and timestamp tokens."""
    from transformers import GenerationConfig, WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    from krasr_batch.engines.vocab import LANGUAGES as MY_LANGUAGES
    from krasr_batch.engines.vocab import TO_LANGUAGE_CODE as MY_CODES
    from krasr_batch.engines.vocab import WhisperText, generation_config

    assert MY_LANGUAGES == LANGUAGES and MY_CODES == TO_LANGUAGE_CODE
    ref, mine = WhisperTokenizer.from_pretrained(str(tiny_model)), WhisperText(tiny_model)
    assert mine.unk_token_id == ref.unk_token_id
    specials = ["<|startoftranscript|>", "<|kk|>", "<|ru|>", "<|transcribe|>", "<|notimestamps|>", "<|endoftext|>",
                "<|nospeech|>", "<|nocaptions|>", "<|startofprev|>", "<|no such token|>"]
    assert [mine.convert_tokens_to_ids(t) for t in specials] == [ref.convert_tokens_to_ids(t) for t in specials]
    rng = np.random.default_rng(0)
    text_ids = ref.encode(" Өтінемін, терезені жабыңыз. Он долго искал ключи, но не нашёл их! It's 5 o'clock?",
                          add_special_tokens=False)
    start, prev = ref.convert_tokens_to_ids("<|startoftranscript|>"), ref.convert_tokens_to_ids("<|startofprev|>")
    seqs = [text_ids, [start, ref.convert_tokens_to_ids("<|kk|>"), *text_ids, ref.eos_token_id],
            [prev, *text_ids[:3], start, *text_ids[3:]], [prev, *text_ids], [],
            [start, ref.convert_tokens_to_ids("<|notimestamps|>"), 50364, *text_ids[:4], 50400]]
    seqs += [rng.integers(0, 50257, int(rng.integers(1, 60))).tolist() for _ in range(200)]
    for ids in seqs:
        for skip in (True, False):
            assert mine.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (ids, skip)
    gc, my_gc = GenerationConfig.from_pretrained(str(tiny_model)), generation_config(tiny_model)
    for key in ("decoder_start_token_id", "eos_token_id", "no_timestamps_token_id", "lang_to_id", "task_to_id"):
        assert getattr(my_gc, key) == getattr(gc, key), key
