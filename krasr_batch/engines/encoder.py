"""Whisper's encoder in torch: in bfloat16 for CTranslate2 replicas on CPUs with bfloat16 matrix units, and
the torch engine's encoder on those CPUs and on GPUs (float16).

Why: on a CPU a segment's encoder pass over its 30 s window is half of a CTranslate2 replica's model time
(BENCHMARKS.md, profile-cpu-archive-sample). On CPUs with AMX or AVX512-BF16, oneDNN runs the encoder's
matrices in bfloat16 about three times faster than CTranslate2's int8 encoder (whisper-base, one thread,
a Sapphire Rapids core: 0.335 s a window against 1.038 s; `benchmarks/encoder_cost.py`). CTranslate2 then
decodes from that encoder output (``Whisper.generate`` accepts encoded features), so beam search stays in
C++.

Why not transformers' ``WhisperEncoder``: importing transformers' Whisper modeling costs a replica about
3.7 s of start-up here, on top of torch's 1.8 s; the encoder is 40 lines of torch. tests/test_encoder.py
holds this module's output equal to transformers' ``WhisperEncoder`` in float32 on the same weights.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def cpu_compute_type() -> str:
    """What ``--dtype auto`` resolves to for the torch engine on this CPU: bfloat16 where it multiplies
    bfloat16 matrices natively (:func:`cpu_has_bf16_matmul`), else float32."""
    return "bfloat16" if cpu_has_bf16_matmul() else "float32"


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX-BF16 or AVX512-BF16), which torch's oneDNN
    kernels use. Read from /proc/cpuinfo once per process (a replica asks for its compute type and its
    encoder), so that asking costs no torch import; False where it is absent."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def weights_under(folder: Path, prefixes: tuple[str, ...]) -> dict:
    """The tensors of ``folder``'s safetensors whose names start with one of ``prefixes``, prefix removed
    (WhisperForConditionalGeneration's ``model.encoder.`` or a bare WhisperModel's ``encoder.``, say); only
    those tensors are read."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                for p in prefixes:
                    if key.startswith(p):
                        out[key[len(p):]] = st.get_tensor(key)
    return out


# query rows per product in ``attention`` on a CPU: a window's scores for them (heads x rows x 1500 in bfloat16,
# 3 MB for 8 heads) stay in the core's cache between the two products
QUERY_BLOCK = 128


def sdpa_attention(q, k, v):
    """``scaled_dot_product_attention`` over ``(windows, heads, frames, head_dim)``, returned as
    ``(windows, frames, heads, head_dim)``: :func:`attention` off CPUs and in float32."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def attention(q, k, v):
    """Self-attention of ``(windows, heads, frames, head_dim)`` queries, keys and values, returned as
    ``(windows, frames, heads, head_dim)``.

    In bfloat16 on a CPU: two products a block of query rows, the scores in bfloat16 as the first product
    gives them. PyTorch's CPU flash-attention kernel, which keeps them in float32, ran the same attention at
    half this speed on an AMD EPYC (AVX512-BF16), where it was 63 % of the encoder's time (BENCHMARKS.md, "The
    encoder's attention in two products"). A score rounds to bfloat16 relative to its size, so each window's
    keys are centred first (their mean over the frames taken off, in float32): a query's scores all move by
    the same amount, which its softmax does not see, and are smaller. Elsewhere (float32 on a CPU, where that
    kernel is the faster; a GPU) :func:`sdpa_attention`.
    """
    import torch

    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return sdpa_attention(q, k, v)
    windows, _, frames, head_dim = q.shape
    out = q.new_empty(windows, frames, q.shape[1], head_dim)
    for w in range(windows):
        keys = k[w].float()
        keys = ((keys - keys.mean(1, keepdim=True)) * head_dim ** -0.5).to(q.dtype).transpose(-1, -2).contiguous()
        values = v[w].contiguous()
        for i in range(0, frames, QUERY_BLOCK):
            scores = torch.matmul(q[w, :, i:i + QUERY_BLOCK], keys)
            out[w, i:i + QUERY_BLOCK] = torch.matmul(torch.softmax(scores, -1), values).transpose(0, 1)
    return out


def _module(config: dict):
    import torch.nn.functional as F
    from torch import nn

    d, heads = config["d_model"], config["encoder_attention_heads"]
    if config.get("activation_function", "gelu") != "gelu":
        raise ValueError(f"unsupported encoder activation {config.get('activation_function')!r}")

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(d, d)
            self.k_proj = nn.Linear(d, d, bias=False)
            self.v_proj = nn.Linear(d, d)
            self.out_proj = nn.Linear(d, d)

        def forward(self, x):
            b, t, _ = x.shape

            def split(y):
                return y.view(b, t, heads, d // heads).transpose(1, 2)

            y = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
            return self.out_proj(y.reshape(b, t, d))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()
            self.self_attn_layer_norm = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, config["encoder_ffn_dim"])
            self.fc2 = nn.Linear(config["encoder_ffn_dim"], d)
            self.final_layer_norm = nn.LayerNorm(d)

        act = staticmethod(F.gelu)  # the identity once fc1 applies it itself (:func:`pack_linears`)

        def forward(self, x):
            x = x + self.self_attn(self.self_attn_layer_norm(x))
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv1d(config["num_mel_bins"], d, kernel_size=3, padding=1)
            self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
            self.embed_positions = nn.Embedding(config["max_source_positions"], d)
            self.layers = nn.ModuleList(Layer() for _ in range(config["encoder_layers"]))
            self.layer_norm = nn.LayerNorm(d)

        def forward(self, features):
            # frames-major in memory: permuted alone, the residual stream would keep the convolution's
            # channels-major layout through every layer (each add and norm over strided memory)
            x = F.gelu(self.conv2(F.gelu(self.conv1(features)))).permute(0, 2, 1).contiguous()
            x = x + self.embed_positions.weight[: x.shape[1]]
            for layer in self.layers:
                x = layer(x)
            return self.layer_norm(x)

    return Encoder()


def pack_weight(weight, rows: int):
    """``weight`` (out x in) laid out once for oneDNN's linear kernels (``torch.ops.mkldnn``, as torch's own
    compiler does on CPUs): 1.5 to 1.9 times faster than ``F.linear`` at a beam step's 48 rows in bfloat16.
    Where this torch build has no oneDNN, the transposed weight for ``torch.mm``; on a GPU, as it is, for
    ``F.linear`` (cuBLAS). ``rows``: the rows a call multiplies (oneDNN's layout hint; any count works)."""
    import torch

    if weight.device.type != "cpu":
        return "linear", weight.contiguous(), weight.shape[0]
    try:
        if torch.backends.mkldnn.is_available():
            return "mkldnn", torch.ops.mkldnn._reorder_linear_weight(weight, rows), weight.shape[0]
    except (RuntimeError, AttributeError):  # an older or trimmed build: plain matrix products
        pass
    return "mm", weight.t().contiguous(), weight.shape[0]


def apply_packed(packed, x, bias=None, gelu: bool = False):
    """``x @ W^T + bias`` with a :func:`pack_weight` weight, and then the exact GELU (as ``F.gelu``) where
    ``gelu``: inside oneDNN's kernel, which adds the bias there too, else after the product."""
    import torch
    import torch.nn.functional as F

    kind, w, out = packed
    if kind == "mkldnn":  # algorithm "none": the exact GELU, not tanh's approximation
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    if kind == "linear":
        y = F.linear(x, w, bias)
    else:
        flat = x.reshape(-1, x.shape[-1])
        y = (torch.mm(flat, w) if bias is None else torch.addmm(bias, flat, w)).view(*x.shape[:-1], out)
    return F.gelu(y) if gelu else y


def _identity(x):
    return x


def pack_linears(encoder, rows: int) -> bool:
    """Each linear layer of the encoder's layers as oneDNN's linear with its weight laid out once
    (:func:`pack_weight`, as the torch engine's decoder holds them), its bias added in the kernel, and the
    feed-forward layer's GELU applied in it too (exact, as ``F.gelu``): a bfloat16 ``nn.Linear`` first copies
    its bias into the output (a call's 6000 x 2048 hidden layer: 10 ms), and the GELU reads and writes that
    layer again. False where this torch build has no oneDNN (nothing changed)."""
    import torch
    from torch import nn

    if not torch.backends.mkldnn.is_available():
        return False

    class PackedLinear(nn.Module):
        def __init__(self, linear: nn.Linear, gelu: bool = False):
            super().__init__()
            self.packed = pack_weight(linear.weight.detach(), rows)
            self.bias = None if linear.bias is None else linear.bias.detach()
            self.gelu = gelu

        def forward(self, x):
            return apply_packed(self.packed, x, self.bias, self.gelu)

    for layer in encoder.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(attn, name, PackedLinear(getattr(attn, name)))
        layer.fc1, layer.act, layer.fc2 = PackedLinear(layer.fc1, gelu=True), _identity, PackedLinear(layer.fc2)
    return True


class TorchEncoder:
    """Whisper's encoder from a transformers model folder's safetensors, on ``device`` (the CPU, or a GPU for
    the torch engine), in ``dtype``.

    ``encoder(features)`` takes log-mel features ``(batch, mels, 3000)`` as a float32 numpy array and returns
    the encoder output ``(batch, 1500, d_model)`` as a float32 numpy array; ``encoder.encode(features)`` takes
    and returns torch tensors on the device (the output in ``dtype``).
    """

    def __init__(self, folder: str | Path, dtype: str = "bfloat16", threads: int | None = None,
                 device: str = "cpu"):
        import torch

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        self.dtype = getattr(torch, dtype)
        self.encoder = _module(config)
        state = weights_under(folder, ("model.encoder.", "encoder."))
        try:
            missing, unexpected = self.encoder.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a shape that is not this config's
            missing, unexpected = [str(e).splitlines()[-1].strip()], []
        if missing or unexpected:
            raise RuntimeError(f"{folder}: the encoder's weights do not match Whisper's encoder "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.device = device
        self.encoder.to(device=device, dtype=self.dtype).eval()
        if device == "cpu" and self.dtype == torch.bfloat16:
            pack_linears(self.encoder, self.chunk * config.get("max_source_positions", 1500))
        if device != "cpu":
            self.chunk = 32  # a GPU's encoder time is linear in the batch past a few windows too
        if threads:
            torch.set_num_threads(threads)

    # windows per encoder call: bounds the attention's working memory (batch x heads x 1500 x 1500) at no cost
    # in speed, as a CPU's encoder time is linear in the batch
    chunk = 4

    def __call__(self, features):
        import numpy as np
        import torch

        features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return self.encode(features).float().cpu().numpy()

    def encode(self, features):
        """``features`` (a float tensor, any device) -> the encoder output on the device, in ``dtype``."""
        import torch

        with torch.inference_mode():
            parts = [self.encoder(features[i:i + self.chunk].to(self.device, self.dtype))
                     for i in range(0, len(features), self.chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
