"""Read a CTranslate2 Whisper ``model.bin`` back into transformers' ``WhisperForConditionalGeneration`` names.

Contract:
- :func:`read_model_bin` parses CTranslate2's binary format (version 4 or later: a spec name and revision,
  then named variables, each rank, dims, dtype id and raw little-endian bytes) into ``{name: np.ndarray}``.
  Arrays are views of the buffer; nothing is converted.
- :func:`to_transformers` renames those variables to a transformers state dict of float32 ``torch.Tensor``
  and returns the config shape read off the arrays (``d_model``, layers, heads, ffn sizes, vocabulary).
  CTranslate2 fuses self-attention's q, k, v into one projection and cross-attention's k, v into another, and
  keeps no bias for k (Whisper has none): they are split here. ``proj_out`` is tied to the token embedding,
  so it is absent from the state dict.
Used only to build the real-weights test checkpoint; needs numpy and (for :func:`to_transformers`) torch.
"""

from __future__ import annotations

import re
import struct

import numpy as np

#: CTranslate2's dtype ids (``ctranslate2::DataType``) to numpy.
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class _Cursor:
    """Sequential little-endian reads over one bytes buffer."""

    def __init__(self, buf: bytes):
        self.buf, self.off = buf, 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.off)
        self.off += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.take("H")  # length including the trailing NUL
        s = self.buf[self.off:self.off + n - 1].decode()
        self.off += n
        return s

    def array(self, dtype, dims: tuple[int, ...]) -> np.ndarray:
        (nbytes,) = self.take("I")
        a = np.frombuffer(self.buf, dtype, nbytes // np.dtype(dtype).itemsize, self.off)
        self.off += nbytes
        return a.reshape(dims)


def read_model_bin(buf: bytes) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 model.bin, by its CTranslate2 name (``encoder/layer_0/...``)."""
    cur = _Cursor(buf)
    (version,) = cur.take("I")
    if version < 4:
        raise ValueError(f"CTranslate2 binary version {version} is too old (need 4 or later)")
    cur.string()  # spec name
    cur.take("I")  # spec revision
    (count,) = cur.take("I")
    variables = {}
    for _ in range(count):
        name = cur.string()
        (rank,) = cur.take("B")
        dims = cur.take(f"{rank}I") if rank else ()
        (dtype_id,) = cur.take("B")
        variables[name] = cur.array(DTYPES[dtype_id], dims)
    return variables


def _layer_ids(v: dict, side: str) -> list[int]:
    return sorted({int(m.group(1)) for k in v if (m := re.match(side + r"/layer_(\d+)/", k))})


def to_transformers(v: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(state dict in transformers' names, WhisperConfig shape keywords) from :func:`read_model_bin`'s output."""
    import torch

    d_model = v["encoder/conv1/weight"].shape[0]
    sd: dict = {}

    def t(name: str):
        return torch.from_numpy(np.array(v[name], dtype=np.float32))

    def lin(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct}/weight"), t(f"{ct}/bias")

    def norm(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct}/gamma"), t(f"{ct}/beta")

    def self_attn(hf: str, ct: str) -> None:
        q, k, val = t(f"{ct}/linear_0/weight").split(d_model)
        qb, _, vb = t(f"{ct}/linear_0/bias").split(d_model)
        sd.update({f"{hf}.q_proj.weight": q, f"{hf}.k_proj.weight": k, f"{hf}.v_proj.weight": val,
                   f"{hf}.q_proj.bias": qb, f"{hf}.v_proj.bias": vb})
        lin(f"{hf}.out_proj", f"{ct}/linear_1")
        norm(f"{hf}_layer_norm", f"{ct}/layer_norm")

    def ffn(hf: str, ct: str) -> None:
        lin(f"{hf}.fc1", f"{ct}/linear_0")
        lin(f"{hf}.fc2", f"{ct}/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/layer_norm")

    def cross_attn(hf: str, ct: str) -> None:
        lin(f"{hf}.q_proj", f"{ct}/linear_0")
        k, val = t(f"{ct}/linear_1/weight").split(d_model)
        sd[f"{hf}.k_proj.weight"], sd[f"{hf}.v_proj.weight"] = k, val
        sd[f"{hf}.v_proj.bias"] = t(f"{ct}/linear_1/bias").split(d_model)[1]
        lin(f"{hf}.out_proj", f"{ct}/linear_2")
        norm(f"{hf}_layer_norm", f"{ct}/layer_norm")

    enc, dec = "model.encoder", "model.decoder"
    lin(f"{enc}.conv1", "encoder/conv1")
    lin(f"{enc}.conv2", "encoder/conv2")
    sd[f"{enc}.embed_positions.weight"] = t("encoder/position_encodings/encodings")
    for i in _layer_ids(v, "encoder"):
        self_attn(f"{enc}.layers.{i}.self_attn", f"encoder/layer_{i}/self_attention")
        ffn(f"{enc}.layers.{i}", f"encoder/layer_{i}/ffn")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    sd[f"{dec}.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = t("decoder/position_encodings/encodings")
    for i in _layer_ids(v, "decoder"):
        self_attn(f"{dec}.layers.{i}.self_attn", f"decoder/layer_{i}/self_attention")
        cross_attn(f"{dec}.layers.{i}.encoder_attn", f"decoder/layer_{i}/attention")
        ffn(f"{dec}.layers.{i}", f"decoder/layer_{i}/ffn")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    return sd, _shape(v)


def _shape(v: dict[str, np.ndarray]) -> dict:
    """WhisperConfig keywords read off the arrays."""
    return dict(d_model=v["encoder/conv1/weight"].shape[0], num_mel_bins=v["encoder/conv1/weight"].shape[1],
                encoder_layers=len(_layer_ids(v, "encoder")), decoder_layers=len(_layer_ids(v, "decoder")),
                encoder_attention_heads=int(v["encoder/num_heads"]), decoder_attention_heads=int(v["decoder/num_heads"]),
                encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
                vocab_size=v["decoder/embeddings/weight"].shape[0])
