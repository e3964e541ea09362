"""--engine auto: the fastest engine that keeps the card's accuracy, per device (engines.choose_engine)."""

import pytest

from krasr_batch.engines import choose_engine, encoder, load_decoder
from krasr_batch.engines.base import CT2_CPU_BATCH, TORCH_GPU_BATCH, default_batch_size
from krasr_batch.settings import DecodeOptions, RunSettings, build_settings


def test_auto_is_the_default_and_resolves_per_device(monkeypatch):
    assert DecodeOptions().engine == "auto"
    # a CPU without bfloat16 units: ctranslate2, a regular dependency (with them: tests/test_torch_beam.py)
    monkeypatch.setattr(encoder, "cpu_has_bf16_matmul", lambda: False)
    assert choose_engine(use_gpu=False)[0] == "ctranslate2"
    # GPUs: the torch engine (measured there, block gpu-check), transformers for what it lacks
    assert choose_engine(use_gpu=True)[0] == "torch"
    assert choose_engine(use_gpu=True, dtype="bfloat16")[0] == "torch"
    assert choose_engine(use_gpu=True, dtype="int8")[0] == "transformers"


def test_an_unresolved_auto_is_never_fingerprinted():
    with pytest.raises(ValueError, match="resolved"):
        RunSettings().output_fingerprint()
    # resolved to transformers it is the fingerprint of the runs made before engines were a choice
    old = build_settings({"engine": "transformers"}).output_fingerprint()
    assert RunSettings().with_engine("transformers").output_fingerprint() == old
    assert RunSettings().with_engine("ctranslate2").output_fingerprint() != old


def test_batch_defaults_follow_engine_and_device():
    assert default_batch_size(0, "cpu", "ctranslate2") == CT2_CPU_BATCH > 1
    assert default_batch_size(0, "cpu", "transformers") == 1
    assert default_batch_size(0, "cuda", "ctranslate2") == default_batch_size(0, "cuda") == 16
    assert default_batch_size(0, "cuda", "torch") == TORCH_GPU_BATCH == 64
    assert default_batch_size(5, "cpu", "ctranslate2") == 5


def test_a_replica_resolves_auto_by_its_own_device(tiny_model, monkeypatch):
    monkeypatch.setattr(encoder, "cpu_has_bf16_matmul", lambda: False)
    dec = load_decoder(DecodeOptions(model=str(tiny_model)), "cpu", 1)
    assert dec.engine == "ctranslate2" and dec.batch_size == CT2_CPU_BATCH
