"""Whisper's encoder in torch (engines/encoder.py), which CTranslate2 replicas run in bfloat16 on CPUs with
bfloat16 matrix units: equal to transformers' encoder, and wired into the CTranslate2 engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from krasr_batch.engines import SegmentInput, load_decoder
from krasr_batch.engines.encoder import TorchEncoder, cpu_has_bf16_matmul
from krasr_batch.settings import DecodeOptions

from .conftest import read_jsonl

ct2_engine = pytest.importorskip("krasr_batch.engines.ctranslate2")


def _reference(model, features: np.ndarray) -> np.ndarray:
    from transformers import WhisperForConditionalGeneration

    ref = WhisperForConditionalGeneration.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.inference_mode():
        return ref.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()


def test_float32_equals_transformers_encoder(tiny_model):
    features = np.random.default_rng(0).normal(0, 0.5, (5, 80, 3000)).astype(np.float32)  # 5: two chunks of 4
    ref = _reference(tiny_model, features)
    mine = TorchEncoder(tiny_model, "float32")(features)
    assert mine.dtype == np.float32 and mine.shape == ref.shape
    np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=1e-4)


def test_bfloat16_stays_close_to_float32(base_model):
    """bfloat16 keeps 8 bits of mantissa: the real weights' encoder output moves by about 1 % of its size."""
    features = np.random.default_rng(1).normal(0, 0.5, (2, 80, 3000)).astype(np.float32)
    ref = TorchEncoder(base_model, "float32")(features)
    mine = TorchEncoder(base_model, "bfloat16")(features)
    rel = np.abs(mine - ref).mean() / np.abs(ref).mean()
    assert rel < 0.03, rel


def test_packed_linears_are_the_layers_they_replace(tiny_model):
    """engines.encoder.pack_linears: every linear layer of the encoder as oneDNN's, its bias and the
    feed-forward GELU (exact) in the kernel. In float32 the encoder's output stays transformers' (each layer
    wired as before); a bfloat16 encoder on a CPU runs packed, and no further from float32 than unpacked."""
    from krasr_batch.engines.encoder import pack_linears

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    features = np.random.default_rng(2).normal(0, 0.5, (5, 80, 3000)).astype(np.float32)
    ref = _reference(tiny_model, features)
    enc = TorchEncoder(tiny_model, "float32")
    assert pack_linears(enc.encoder, 6000)
    layer = enc.encoder.layers[0]
    assert type(layer.fc1).__name__ == "PackedLinear" and layer.fc1.gelu and layer.fc1.packed[0] == "mkldnn"
    assert {type(getattr(layer.self_attn, n)).__name__ for n in ("q_proj", "k_proj", "v_proj", "out_proj")} == {
        "PackedLinear"}
    np.testing.assert_allclose(enc(features), ref, atol=1e-4, rtol=1e-4)

    low = TorchEncoder(tiny_model, "bfloat16")
    assert type(low.encoder.layers[-1].fc2).__name__ == "PackedLinear"
    plain = TorchEncoder.__new__(TorchEncoder)  # the same encoder with nn.Linear layers, as before
    plain.__dict__.update(low.__dict__, encoder=TorchEncoder(tiny_model, "float32").encoder.to(torch.bfloat16))

    def err(e):
        return float(np.abs(e(features) - ref).mean() / np.abs(ref).mean())

    assert err(low) <= 1.1 * err(plain), (err(low), err(plain))


def test_the_cpu_attention_in_bfloat16_is_as_close_as_the_flash_kernel():
    """engines.encoder.attention: float32 is scaled_dot_product_attention's; bfloat16 (two products a block of
    query rows, scores in bfloat16) as close to float32 as PyTorch's flash kernel, which keeps the scores in
    float32, also where every key shares a large component (a score rounds relative to its size: the keys are
    centred, which the softmax does not see; without it the error here is 1.4 times the kernel's)."""
    import torch.nn.functional as F

    from krasr_batch.engines.encoder import QUERY_BLOCK, attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2 * QUERY_BLOCK + 44, 64, generator=g) for _ in range(3))  # a short last block
    k = k + 10 * torch.randn(1, 4, 1, 64, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert torch.equal(attention(q, k, v), ref)
    low = [t.bfloat16() for t in (q, k, v)]
    mine, flash = attention(*low), F.scaled_dot_product_attention(*low).transpose(1, 2)
    assert mine.dtype == torch.bfloat16 and mine.shape == ref.shape

    def err(o):
        return float((o.float() - ref).norm() / ref.norm())

    assert err(mine) <= 1.15 * err(flash), (err(mine), err(flash))


def test_weights_that_are_not_whispers_encoder_are_refused(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import save_file

    shutil.copy(tiny_model / "config.json", tmp_path)
    save_file({"model.encoder.conv1.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="do not match Whisper's encoder"):
        TorchEncoder(tmp_path, "float32")


def test_when_a_ctranslate2_replica_uses_it():
    native = cpu_has_bf16_matmul()
    assert ct2_engine.cpu_bf16_encoder("auto", "cpu") is native
    for dtype, device in [("int8", "cpu"), ("float32", "cpu"), ("auto", "cuda"), ("float16", "cuda")]:
        assert ct2_engine.cpu_bf16_encoder(dtype, device) is False


def test_the_ctranslate2_engine_decodes_from_the_torch_encoder(base_model, corpus):
    """The torch encoder in float32 in place of CTranslate2's own float32 encoder: the same text, token for
    token, on real speech; in bfloat16 (what --dtype auto runs on such CPUs) the decoder runs from its output."""
    clips = read_jsonl(corpus / "clips.jsonl")[:4]
    from krasr_batch.audio import load_audio

    inputs = [SegmentInput(load_audio(str(corpus / c["path"])), c["language"], 40) for c in clips]
    dec = load_decoder(DecodeOptions(model=str(base_model), engine="ctranslate2", dtype="float32"), "cpu", 1)
    assert dec.torch_encoder is None
    own = dec.decode(inputs)
    dec.torch_encoder = TorchEncoder(base_model, "float32", 1)
    torch_out = dec.decode(inputs)
    assert [o.text for o in torch_out] == [o.text for o in own]
    assert [o.num_tokens for o in torch_out] == [o.num_tokens for o in own]
    dec.torch_encoder = TorchEncoder(base_model, "bfloat16", 1)
    bf16 = dec.decode(inputs)
    assert [o.language for o in bf16] == [o.language for o in own]
    assert sum(o.text == a.text for o, a in zip(bf16, own)) >= 2  # measured 3 of 4
