"""The torch engine (``--engine torch``): Whisper's encoder, decoder and beam search in plain torch, built for
batch decoding on GPUs and on CPUs with bfloat16 matrix units.

Why: on a CPU, beam search over 30 s windows is bound by memory. Each step reads, for every row, its window's
cross-attention keys and values (1500 frames x d_model x 2 per layer: 37 MB in float32 for whisper-base), and
CTranslate2 (``--engine ctranslate2``) keeps one float32 copy per beam. Here a window's beams share one copy, in
bfloat16, and their queries are multiplied with it together: a step reads a sixth of those bytes. On CPUs with
AMX or AVX512-BF16 the weights run in bfloat16 through oneDNN too (BENCHMARKS.md, issue 12's "Fifth round").

On a GPU the same holds for memory, and transformers' ``generate()`` adds per-step Python and a per-beam copy
of the keys and values that it reorders every step: there this engine ran 740x real time against at most 68x
(H100, whisper-small's shape, float16; BENCHMARKS.md, "The GPU check"). The features (``log_mel``), the encoder
and the search stay on the device; each step brings back only each window's best continuations. Two more
searches give the same results with no wait a step: :func:`beam_search_device` (every choice on the device)
and :func:`beam_search_graphed` (each step one CUDA graph); ``TorchBeamDecoder.search`` picks one, and stays
``"host"`` until a GPU has measured the others (``benchmarks/gpu_check.py``).

The beam search is Whisper's (openai-whisper's ``BeamSearchDecoder`` with CTranslate2's logits processing),
batched over windows of any languages and token limits:
- each step, per row: the repetition penalty on the logits of tokens already in the row (divided when positive,
  multiplied when negative, as CTranslate2 applies it), no token that would repeat an n-gram of the row
  (``no_repeat_ngram_size``), the generation config's suppressed tokens, and its begin-suppressed tokens at the
  first step; then log-softmax;
- per window, the ``2 x beams`` best (beam, token) continuations: an end-of-text one ends a hypothesis (up to
  ``beams`` of them), the first ``beams`` others go on. A window is done once ``beams`` hypotheses have ended,
  or at its own token limit (the end-of-text step counts toward it), where its running beams join as cut short;
  it then leaves the batch, so the batch shrinks as its windows end;
- the result is the hypothesis with the best summed log-probability over its length in text tokens.

With ``dtype="float32"`` it gives CTranslate2's float32 tokens on most windows (tests/test_torch_beam.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from krasr_batch.audio import SAMPLE_RATE
from krasr_batch.engines.base import (
    Decoder,
    SegmentInput,
    SegmentOutput,
    default_batch_size,
    language_code,
    local_model_dir,
    require_safetensors,
    resolve_device,
)
from krasr_batch.engines.encoder import apply_packed as _apply
from krasr_batch.engines.encoder import pack_weight as _pack
from krasr_batch.engines.encoder import weights_under
from krasr_batch.engines.timing import Word, num_frames, words_from_weights
from krasr_batch.settings import DecodeOptions

log = logging.getLogger(__name__)

# the rows a step multiplies (16 windows x 3 beams): oneDNN lays the weights out for it once (any count works)
PACK_ROWS = 48


class WhisperDecoderStack:
    """Whisper's decoder from a transformers model folder, weights held transposed for ``x @ W``.

    ``cross(encoded)`` computes each layer's cross-attention keys and values once per window;
    ``step(tokens, pos, cache, cross, beams, where)`` runs ``tokens`` (rows x t, rows = windows x beams, a
    window's beams adjacent) at positions ``pos..pos+t-1`` and returns the logits of the last position in
    float32, as transformers' ``generate()`` takes them: the card's logits processing and the log-softmax
    then run in float32 whatever ``dtype`` (on a CPU also faster: scattering the penalty into 48 rows of
    bfloat16 logits took 1.2-1.8 ms, into float32 0.03-0.08 ms). ``where``: each window's index in
    ``cross`` when ``cross`` holds more windows (ended ones not yet dropped), else None.

    On a CPU a window's beams query its cross-attention keys (frames x head_dim) and values (held transposed,
    head_dim x frames) in two plain products, each reading its right-hand side transposed; on a GPU
    (``device="cuda"``) both go through ``scaled_dot_product_attention`` (fused kernels, in float16 or
    bfloat16), a window's beams as its queries.
    """

    def __init__(self, folder: str | Path, dtype: str = "bfloat16", device: str = "cpu", fused: bool | None = None):
        import torch

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        if config.get("activation_function", "gelu") != "gelu":
            raise ValueError(f"unsupported decoder activation {config.get('activation_function')!r}")
        self.d = config["d_model"]
        self.heads = config["decoder_attention_heads"]
        self.head_dim = self.d // self.heads
        self.layers = config["decoder_layers"]
        self.max_positions = config["max_target_positions"]
        self.dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        self.fused = self.device.type != "cpu" if fused is None else fused
        # the self-attention's keys and values: on a CPU in float32 whatever ``dtype``. oneDNN's bfloat16
        # product of one query with the cache is 2 to 3 times slower than float32's (5.6 against 1.8 ms at 48
        # rows and 200 positions), and it keeps a primitive for every cache length it meets, with memory that
        # grows with the length: a whisper-small replica over 16 windows of 360 tokens peaked at 9.0 GB and
        # kept 7.5 GB, against 3.3 and 1.2 GB now (BENCHMARKS.md, "Ninth round"). The values are the bfloat16
        # projections, held exactly; only the products are wider.
        self.cache_dtype = self.dtype if self.fused else torch.float32
        raw = weights_under(folder, ("model.decoder.", "decoder."))
        expected = ["embed_tokens.weight", "embed_positions.weight", "layer_norm.weight"] + [
            f"layers.{i}.{n}.weight" for i in range(self.layers)
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj",
                      "fc1", "fc2", "self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")]
        missing = [k for k in expected if k not in raw]
        if missing:
            raise RuntimeError(f"{folder}: the decoder's weights are not Whisper's (missing {missing[:3]})")
        scale = self.head_dim ** -0.5
        w = {}
        for key, t in raw.items():
            t = t.float()
            if key.endswith(("q_proj.weight", "q_proj.bias")):
                t = t * scale  # transformers scales the queries after the projection
            w[key] = t.contiguous().to(device=self.device, dtype=self.dtype)
        linears = [k[:-len(".weight")] for k in w if k.endswith(("_proj.weight", "fc1.weight", "fc2.weight"))]
        self.packed = {name: _pack(w.pop(name + ".weight"), PACK_ROWS) for name in linears}
        self.w = w
        self.embed = w["embed_tokens.weight"]  # (vocab, d): the input embedding
        self.logits = _pack(self.embed, PACK_ROWS)  # the tied output projection

    def _linear(self, name: str, x):
        return _apply(self.packed[name], x, self.w.get(name + ".bias"))

    def _norm(self, name: str, x):
        import torch.nn.functional as F

        return F.layer_norm(x, (self.d,), self.w[name + ".weight"], self.w[name + ".bias"])

    def cross(self, encoded) -> list:
        b, t, _ = encoded.shape
        out = []
        for i in range(self.layers):
            p = f"layers.{i}.encoder_attn."
            k = self._linear(p + "k_proj", encoded).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            v = self._linear(p + "v_proj", encoded).view(b, t, self.heads, self.head_dim)
            # on a CPU the values are held as (head_dim, frames): both products then read their right-hand
            # side transposed, the form oneDNN's kernels take fastest (_cross_and_mlp)
            v = v.transpose(1, 2) if self.fused else v.permute(0, 2, 3, 1)
            out.append((k.contiguous(), v.contiguous()))
        return out

    def new_cache(self, rows: int, length: int, zeroed: bool = False) -> list:
        """Each layer's self-attention keys and values for ``rows`` rows of ``length`` positions; ``zeroed``
        where positions not yet written are read (masked: :meth:`step_at`), so that none holds NaN."""
        import torch

        shape = (rows, self.heads, length, self.head_dim)
        new = torch.zeros if zeroed else torch.empty
        dt = self.cache_dtype
        return [(new(shape, dtype=dt, device=self.device), new(shape, dtype=dt, device=self.device))
                for _ in range(self.layers)]

    def _cross_and_mlp(self, i: int, x, cross: list, beams: int, where=None):
        """Layer ``i``'s cross-attention and feed-forward blocks on ``x`` (rows x t x d)."""
        import torch
        import torch.nn.functional as F

        rows, t, d = x.shape
        windows = rows // beams
        h, hd = self.heads, self.head_dim
        p = f"layers.{i}."
        y = self._norm(p + "encoder_attn_layer_norm", x)
        # the window's beams query its keys and values together: one read of them per window
        q = self._linear(p + "encoder_attn.q_proj", y).view(windows, beams, t, h, hd)
        q = q.permute(0, 3, 1, 2, 4).reshape(windows, h, beams * t, hd)
        xk, xv = cross[i]
        if where is not None:  # cross still holds ended windows: theirs query nothing that is kept
            full = q.new_zeros((xk.shape[0],) + q.shape[1:])
            full[where] = q
            q = full
        if self.fused:
            a = F.scaled_dot_product_attention(q, xk, xv, scale=1.0)
        else:  # keys (frames x head_dim) and values (head_dim x frames) both read transposed: each product is
            # then x @ W^T, as a linear layer's, which oneDNN runs fastest at a few rows a window (BENCHMARKS.md,
            # stop 43: keys held as head_dim x frames took 1.6x as long for the same bytes)
            a = torch.matmul(torch.matmul(q, xk.transpose(-1, -2)).softmax(-1), xv.transpose(-1, -2))
        if where is not None:
            a = a[where]
        a = a.view(windows, h, beams, t, hd).permute(0, 2, 3, 1, 4).reshape(rows, t, d)
        x = x + self._linear(p + "encoder_attn.out_proj", a)
        y = self._norm(p + "final_layer_norm", x)
        x = x + self._linear(p + "fc2", F.gelu(self._linear(p + "fc1", y)))
        return x

    def step_at(self, tokens, pos_t, cache: list, cross: list, beams: int, length: int):
        """:meth:`step` for one token a row at position ``pos_t`` (a one-element tensor on the device) with
        every shape fixed: the self-attention runs over the cache's first ``length`` positions, those after
        ``pos_t`` masked, so the same kernels serve every step up to ``length`` (one CUDA graph)."""
        import torch

        rows = tokens.shape[0]
        h, hd, d = self.heads, self.head_dim, self.d
        x = self.embed[tokens] + self.w["embed_positions.weight"].index_select(0, pos_t)
        ahead = torch.arange(length, device=self.device) > pos_t
        dt = self.cache_dtype
        mask = torch.zeros(length, dtype=dt, device=self.device).masked_fill_(ahead, -math.inf)
        for i in range(self.layers):
            p = f"layers.{i}."
            y = self._norm(p + "self_attn_layer_norm", x)
            q = self._linear(p + "self_attn.q_proj", y).view(rows, 1, h, hd).transpose(1, 2).to(dt)
            ck, cv = cache[i]
            for c, n in ((ck, "k"), (cv, "v")):
                c.index_copy_(2, pos_t, self._linear(p + f"self_attn.{n}_proj", y).view(rows, 1, h, hd)
                              .transpose(1, 2).to(dt))
            a = torch.matmul((torch.matmul(q, ck[:, :, :length].transpose(-1, -2)) + mask).softmax(-1),
                             cv[:, :, :length]).to(x.dtype)
            x = x + self._linear(p + "self_attn.out_proj", a.transpose(1, 2).reshape(rows, 1, d))
            x = self._cross_and_mlp(i, x, cross, beams)
        x = self._norm("layer_norm", x[:, -1])
        return _apply(self.logits, x).float()

    def teacher_forced(self, tokens, cross: list, heads: list[tuple[int, int]]):
        """One pass over whole rows of ``tokens`` (windows x t, one row a window, causal): the final layer
        norm's output at every position (windows x t x d) and the cross-attention weights of ``heads``
        ((layer, head) pairs, as a generation config's ``alignment_heads``), windows x heads x t x frames in
        float32, for word timing (engines/timing.py)."""
        import torch
        import torch.nn.functional as F

        rows, t = tokens.shape
        h, hd, d = self.heads, self.head_dim, self.d
        x = self.embed[tokens] + self.w["embed_positions.weight"][:t]
        picked: dict[int, object] = {}
        for i in range(self.layers):
            p = f"layers.{i}."
            y = self._norm(p + "self_attn_layer_norm", x)
            q, k, v = (self._linear(p + f"self_attn.{n}_proj", y).view(rows, t, h, hd).transpose(1, 2)
                       for n in ("q", "k", "v"))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            x = x + self._linear(p + "self_attn.out_proj", a.transpose(1, 2).reshape(rows, t, d))
            want = [hh for layer, hh in heads if layer == i]
            if want:  # the heads' weights, in float32 (the layer's output below is the usual one)
                y = self._norm(p + "encoder_attn_layer_norm", x)
                q = self._linear(p + "encoder_attn.q_proj", y).view(rows, t, h, hd).transpose(1, 2)[:, want]
                xk = cross[i][0][:, want].transpose(-1, -2)  # (windows, heads, head_dim, frames)
                picked[i] = torch.matmul(q.float(), xk.float()).softmax(-1)
            x = self._cross_and_mlp(i, x, cross, 1)
        by_layer = {layer: 0 for layer in picked}
        weights = []
        for layer, _ in heads:
            weights.append(picked[layer][:, by_layer[layer]])
            by_layer[layer] += 1
        return self._norm("layer_norm", x), torch.stack(weights, 1)

    def step(self, tokens, pos: int, cache: list, cross: list, beams: int, where=None):
        import torch
        import torch.nn.functional as F

        rows, t = tokens.shape
        h, hd, d = self.heads, self.head_dim, self.d
        x = self.embed[tokens] + self.w["embed_positions.weight"][pos:pos + t]
        for i in range(self.layers):
            p = f"layers.{i}."
            y = self._norm(p + "self_attn_layer_norm", x)
            ck, cv = cache[i]
            q = self._linear(p + "self_attn.q_proj", y).view(rows, t, h, hd).transpose(1, 2).to(ck.dtype)
            ck[:, :, pos:pos + t] = self._linear(p + "self_attn.k_proj", y).view(rows, t, h, hd).transpose(1, 2)
            cv[:, :, pos:pos + t] = self._linear(p + "self_attn.v_proj", y).view(rows, t, h, hd).transpose(1, 2)
            # the prompt attends causally over itself; a later step's one token over all before it: on a CPU two
            # products (over a bfloat16 cache 2 to 2.7x faster than the flash kernel at one query, BENCHMARKS.md,
            # "Seventh round"; over today's float32 cache level with it: 6.4 against 5.9 ms at 48 rows x 200)
            if t == 1 and not self.fused:
                a = torch.matmul(torch.matmul(q, ck[:, :, :pos + 1].transpose(-1, -2)).softmax(-1), cv[:, :, :pos + 1])
            else:
                a = F.scaled_dot_product_attention(q, ck[:, :, :pos + t], cv[:, :, :pos + t],
                                                   is_causal=t > 1 and pos == 0, scale=1.0)
            a = a.to(x.dtype)
            x = x + self._linear(p + "self_attn.out_proj", a.transpose(1, 2).reshape(rows, t, d))
            x = self._cross_and_mlp(i, x, cross, beams, where)
        x = self._norm("layer_norm", x[:, -1])
        return _apply(self.logits, x).float()


# on a GPU, cross-attention keys and values of ended windows are dropped once the windows still decoding fall
# below this share of those held: each drop copies the kept windows' keys and values (55 MB a window for
# whisper-small in float16), and windows that end a step apart would copy them every step. On a CPU they are
# dropped at once (as measured in BENCHMARKS.md): a step there costs far more than the copy.
COMPACT_BELOW = 0.75


def _process_logits(logits, seqs, cur: int, first: bool, repetition_penalty: float, no_repeat_ngram_size: int,
                    suppress_t, begin_t) -> None:
    """The card's logits processing, in place, on each row's logits after its tokens ``seqs[:, :cur]``: the
    repetition penalty (divided when positive, multiplied when negative, as CTranslate2 applies it), -inf for
    each token that would repeat an n-gram of the row, the suppressed tokens, and the begin-suppressed ones at
    the ``first`` step."""
    import torch

    if repetition_penalty != 1.0:
        prev = seqs[:, :cur]
        g = logits.gather(1, prev)
        logits.scatter_(1, prev, torch.where(g < 0, g * repetition_penalty, g / repetition_penalty))
    m = no_repeat_ngram_size
    if m and cur >= m:
        grams = seqs[:, :cur].unfold(1, m, 1)  # every n-gram of each row
        hit = (grams[:, :, :m - 1] == seqs[:, None, cur - m + 1:cur]).all(-1)
        # -inf where an n-gram's first m-1 tokens are the row's last m-1 (adding 0 elsewhere)
        ban = torch.zeros(hit.shape, dtype=logits.dtype, device=logits.device).masked_fill_(hit, -math.inf)
        logits.scatter_add_(1, grams[:, :, m - 1], ban)
    if len(suppress_t):
        logits.index_fill_(1, suppress_t, -math.inf)
    if first and len(begin_t):
        logits.index_fill_(1, begin_t, -math.inf)


def _batch(stack: WhisperDecoderStack, prompts: list[list[int]], limits: list[int]) -> tuple[int, int, list[int]]:
    """(windows, prompt length, each window's steps: at least 1, within the model's positions)."""
    plen = len(prompts[0])
    return len(prompts), plen, [max(1, min(int(x), stack.max_positions - plen)) for x in limits]


def beam_search(stack: WhisperDecoderStack, cross: list, prompts: list[list[int]], limits: list[int], *,
                beams: int, eos: int, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                suppress: tuple[int, ...] = (), begin_suppress: tuple[int, ...] = (),
                compact_below: float | None = None) -> list[tuple[list[int], float, bool]]:
    """Beam search over a batch of windows (module docstring): per window ``(tokens, summed log-probability,
    ended)``; ``ended`` False when it stopped at its limit. ``prompts``: one per window, all of one length;
    ``limits``: each window's most decoding steps, the end-of-text step included; ``compact_below``: when to
    drop ended windows' cross-attention keys and values (:data:`COMPACT_BELOW`; default: at once on a CPU).

    The tensors live on the stack's device; each step brings back only the ``2 x beams`` best continuations of
    each window (one transfer), and the host keeps its own copy of the tokens for the hypotheses it ends."""
    import torch

    k = beams
    dev = stack.device
    if compact_below is None:
        compact_below = COMPACT_BELOW if dev.type != "cpu" else 1.0
    n_win, plen, limits = _batch(stack, prompts, limits)
    length = plen + max(limits)
    cache = stack.new_cache(n_win * k, length)
    host = torch.zeros(n_win * k, length, dtype=torch.long)  # the tokens, on the host
    host[:, :plen] = torch.tensor(prompts, dtype=torch.long).repeat_interleave(k, 0)
    seqs = host.to(dev, copy=True)  # the same, on the device (repetition penalty, n-gram ban); never aliased
    logits = stack.step(seqs[:, :plen], 0, cache, cross, k)
    scores = torch.tensor([0.0] + [-math.inf] * (k - 1), device=dev).repeat(n_win)  # step 1 expands beam 0 only
    suppress_t = torch.tensor(sorted(set(suppress)), dtype=torch.long, device=dev)
    begin_t = torch.tensor(sorted(set(begin_suppress)), dtype=torch.long, device=dev)
    alive = list(range(n_win))
    held = list(range(n_win))  # the windows cross holds, in order (alive ones and ended ones not yet dropped)
    where = None
    ended: list[list[tuple[list[int], float, bool]]] = [[] for _ in range(n_win)]
    vocab = logits.shape[1]
    n = 0  # tokens decoded so far
    while True:
        cur = plen + n
        _process_logits(logits, seqs, cur, n == 0, repetition_penalty, no_repeat_ngram_size, suppress_t, begin_t)
        total = (torch.log_softmax(logits, -1) + scores[:, None]).view(len(alive), k * vocab)
        top_s, top_i = total.topk(2 * k, dim=1)
        top = torch.stack((top_s.double(), top_i.double()), 1).cpu().tolist()  # one transfer (exact: ids < 2^53)
        n += 1
        rows, toks, new_scores, still = [], [], [], []
        for j, w in enumerate(alive):
            done = ended[w]
            going = []
            for s, idx in zip(*top[j]):
                beam, tok = divmod(int(idx), vocab)
                if s == -math.inf:
                    break
                if tok == eos:
                    if len(done) < k:
                        done.append((host[j * k + beam, plen:cur].tolist(), s, True))
                elif len(going) < k:
                    going.append((j * k + beam, tok, s))
                if len(going) == k:
                    break
            if len(done) >= k or not going:
                continue
            if n >= limits[w]:  # its last step: the running beams are candidates, cut short
                done.extend((host[row, plen:cur].tolist() + [tok], s, False) for row, tok, s in going[:k - len(done)])
                continue
            while len(going) < k:  # fewer finite continuations than beams (a tiny vocabulary): repeat the last
                going.append((going[-1][0], going[-1][1], -math.inf))
            still.append(w)
            for row, tok, s in going:
                rows.append(row)
                toks.append(tok)
                new_scores.append(s)
        if not still:
            break
        moved = [(r, src) for r, src in enumerate(rows) if src != r]
        if moved:  # a row whose beam now continues another row's hypothesis takes that row's cache
            dst = torch.tensor([r for r, _ in moved])
            src = torch.tensor([s for _, s in moved])
            host[dst] = host[src]
            dst, src = dst.to(dev), src.to(dev)
            for ck, cv in cache:
                ck[dst, :, :cur] = ck[src, :, :cur]
                cv[dst, :, :cur] = cv[src, :, :cur]
            seqs[dst] = seqs[src]
        if len(rows) != seqs.shape[0]:
            cache = [(ck[:len(rows)], cv[:len(rows)]) for ck, cv in cache]
            seqs, host = seqs[:len(rows)], host[:len(rows)]
        if len(still) != len(alive):
            if len(still) < compact_below * len(held):  # drop the ended windows' keys and values
                keep = torch.tensor([held.index(w) for w in still], device=dev)
                cross = [(xk.index_select(0, keep), xv.index_select(0, keep)) for xk, xv in cross]
                held, where = list(still), None
            else:
                where = torch.tensor([held.index(w) for w in still], device=dev)
        host[:, cur] = torch.tensor(toks)
        seqs[:, cur] = host[:, cur].to(dev)
        scores = torch.tensor(new_scores, device=dev)
        alive = still
        logits = stack.step(seqs[:, cur:cur + 1], cur, cache, cross, k, where)
    out = []
    for done in ended:
        out.append(max(done, key=lambda h: h[1] / max(len(h[0]), 1)) if done else ([], -math.inf, False))
    return out


# the device search's view of how many windows are still decoding: on a GPU, read from a copy queued this many
# steps back at most (the copy is read once its event has passed; nothing waits for it)
STATUS_SLOTS = 8


class _EndedOnDevice:
    """The device searches' shared part: each window's ended hypotheses in device buffers (``beams`` slots and
    a spare that takes what is not kept) and a step's choice among each window's ``2 x beams`` best (beam,
    token) continuations, as tensor operations only: nothing comes to the host, so a GPU step can be queued
    (or captured in a CUDA graph) without a wait.

    The rules are :func:`beam_search`'s, as masks over the continuations in order: one is looked at while
    fewer than ``beams`` non-end ones come before it; an end-of-text one looked at ends a hypothesis while its
    window has fewer than ``beams``; the first ``beams`` others go on (the last repeated at -inf where fewer
    are finite); a window ends with ``beams`` hypotheses, with none going on, or at its limit (its running
    beams then end as cut short, up to ``beams`` in all). The step number ``n_t`` is a one-element tensor."""

    def __init__(self, n_win: int, beams: int, steps: int, plen: int, limits: list[int], eos: int, dev):
        import torch

        k = self.k = beams
        self.eos, self.plen, self.steps = eos, plen, steps
        self.tok = torch.zeros(n_win, k + 1, steps, dtype=torch.long, device=dev)
        self.len = torch.zeros(n_win, k + 1, dtype=torch.long, device=dev)
        self.score = torch.full((n_win, k + 1), -math.inf, dtype=torch.float32, device=dev)
        self.ended = torch.zeros(n_win, k + 1, dtype=torch.bool, device=dev)
        self.n = torch.zeros(n_win, dtype=torch.long, device=dev)
        self.limit = torch.tensor(limits, dtype=torch.long, device=dev)
        self.ranks = torch.arange(k, device=dev)
        self.tail = torch.arange(2 * k, 4 * k, device=dev)  # sorts the continuations not going on after the others
        self.true = torch.ones((), dtype=torch.bool, device=dev)

    def choose(self, top_s, top_i, vocab: int, seqs, ids, active, n_t):
        """Ends what the step ends; returns each held window's ``beams`` continuations (source row, token,
        score) and which windows go on. ``ids``: the held windows' indices in the batch; ``seqs``: their rows'
        tokens (prompt, then ``steps`` columns)."""
        import torch

        k, plen, steps = self.k, self.plen, self.steps
        w = ids.shape[0]
        tok = top_i % vocab
        src = top_i // vocab + (torch.arange(w, device=ids.device) * k)[:, None]  # each continuation's row
        finite = top_s > -math.inf
        is_eos = (tok == self.eos) & finite
        non = finite & (tok != self.eos)
        seen = (torch.cumsum(non, 1) - non.long()) < k  # fewer than k non-end continuations before it
        eos_seen = is_eos & seen & active[:, None]
        had = self.n[ids]
        slot = had[:, None] + torch.cumsum(eos_seen, 1) - eos_seen.long()
        kept = eos_seen & (slot < k)
        row_w = ids[:, None].expand(w, 2 * k)
        slot = torch.where(kept, slot, k)
        self.tok[row_w, slot] = seqs[src.reshape(-1), plen:].view(w, 2 * k, steps)
        self.len[row_w, slot] = (n_t - 1).expand(w, 2 * k)
        self.score[row_w, slot] = top_s
        self.ended[row_w, slot] = self.true.expand(w, 2 * k)
        had = had + kept.sum(1)
        going = non & seen
        count = going.sum(1)
        first = torch.where(going, torch.cumsum(going, 1) - 1, self.tail).argsort(1)[:, :k]
        has = self.ranks[None, :] < count[:, None]
        first = torch.where(has, first, first.gather(1, (count - 1).clamp(min=0)[:, None]))
        nsrc = src.gather(1, first)
        ntok = tok.gather(1, first)
        nscore = torch.where(has, top_s.gather(1, first), -math.inf)
        stop = active & ((had >= k) | (count == 0))
        cut = active & ~stop & (n_t >= self.limit[ids])  # its last step: the running beams end, cut short
        take = cut[:, None] & has & (self.ranks[None, :] < (k - had)[:, None])
        slot = torch.where(take, had[:, None] + self.ranks[None, :], k)
        row_k = ids[:, None].expand(w, k)
        last = seqs[nsrc.reshape(-1), plen:].view(w, k, steps)
        last.index_copy_(2, n_t - 1, ntok[:, :, None])
        self.tok[row_k, slot] = last
        self.len[row_k, slot] = n_t.expand(w, k)
        self.score[row_k, slot] = nscore
        self.ended[row_k, slot] = ~self.true.expand(w, k)
        self.n[ids] = had + take.sum(1)
        return nsrc, ntok, nscore, active & ~stop & ~cut

    def results(self) -> list[tuple[list[int], float, bool]]:
        """Each window's best ended hypothesis by score over length (one transfer of the buffers)."""
        k = self.k
        toks, lens = self.tok[:, :k].cpu().tolist(), self.len[:, :k].cpu().tolist()
        got, sc, done = self.n.cpu().tolist(), self.score[:, :k].double().cpu().tolist(), self.ended[:, :k].cpu().tolist()
        out = []
        for i in range(len(got)):
            hyps = [(toks[i][j][:lens[i][j]], sc[i][j], done[i][j]) for j in range(got[i])]
            out.append(max(hyps, key=lambda h: h[1] / max(len(h[0]), 1)) if hyps else ([], -math.inf, False))
        return out


class _AliveCount:
    """How many windows are still decoding, as far as the host knows without waiting: on a GPU, the newest
    count whose non-blocking copy (into a pinned ring of :data:`STATUS_SLOTS`) has arrived, at most ``held``;
    on a CPU, the count itself."""

    def __init__(self, dev):
        import collections

        import torch

        self.gpu = dev.type == "cuda"
        if self.gpu:
            self.status = torch.zeros(STATUS_SLOTS, dtype=torch.long, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(STATUS_SLOTS)]
            self.queued: collections.deque = collections.deque()  # the slots whose copies are on their way
            self.free = list(range(STATUS_SLOTS))

    def __call__(self, active, held: int) -> int:
        if not self.gpu:
            return int(active.sum())
        alive = held
        while self.queued and self.events[self.queued[0]].query():
            i = self.queued.popleft()
            alive = int(self.status[i])
            self.free.append(i)
        if self.free:
            i = self.free.pop()
            self.status[i].copy_(active.sum(), non_blocking=True)
            self.events[i].record()
            self.queued.append(i)
        return alive

    def drop_queued(self) -> None:
        """After a wait for the device: the queued copies are older than what is known now."""
        if self.gpu:
            self.free.extend(self.queued)
            self.queued.clear()


def _start(stack: WhisperDecoderStack, cross: list, prompts: list[list[int]], limits: list[int], beams: int,
           suppress, begin_suppress, zeroed: bool = False):
    """The device searches' state after the prompt step, in one namespace that dropping ended windows
    (:func:`_drop_ended`) replaces: the rows' tokens (``seqs``, prompt then ``steps`` columns), caches,
    logits and scores (step 1 expands beam 0 only), the held windows (``ids``, ``active``, ``own``: each
    beam's own row), the cross-attention keys and values, and the batch's shape and suppressed tokens.

    The self-attention keys and values are two caches of the same shape, ``cache`` (what the last step wrote)
    and ``spare``: a step gathers each row's history from ``cache`` straight into ``spare``
    (:func:`_reorder`), writes its own position there, and the two change places. ``zeroed``: where
    positions not yet written are read (masked), so that none holds NaN."""
    import types

    import torch

    k = beams
    dev = stack.device
    n_win, plen, limits = _batch(stack, prompts, limits)
    steps = max(limits)
    st = types.SimpleNamespace(n_win=n_win, plen=plen, limits=limits, steps=steps, cross=cross, seen=None,
                               zeroed=zeroed, cache=stack.new_cache(n_win * k, plen + steps, zeroed=zeroed),
                               spare=stack.new_cache(n_win * k, plen + steps, zeroed=zeroed))
    st.seqs = torch.zeros(n_win * k, plen + steps, dtype=torch.long, device=dev)
    st.seqs[:, :plen] = torch.tensor(prompts, dtype=torch.long).repeat_interleave(k, 0).to(dev)
    st.logits = stack.step(st.seqs[:, :plen], 0, st.cache, cross, k)
    st.scores = torch.tensor([0.0] + [-math.inf] * (k - 1), device=dev).repeat(n_win)
    st.suppress = torch.tensor(sorted(set(suppress)), dtype=torch.long, device=dev)
    st.begin = torch.tensor(sorted(set(begin_suppress)), dtype=torch.long, device=dev)
    st.ids = torch.arange(n_win, device=dev)
    st.own = torch.arange(n_win * k, device=dev).view(n_win, k)
    st.active = torch.ones(n_win, dtype=torch.bool, device=dev)
    return st


def _reorder(st, rows, span: int) -> None:
    """Each row's self-attention history (its first ``span`` positions) from the row ``rows`` names, gathered
    from ``st.cache`` into ``st.spare`` in one pass; the caller swaps the two once the step has run. In place,
    ``cache[:span] = cache[:span][rows]`` reads and writes the history twice (into a temporary, then back)."""
    import torch

    for (ck, cv), (sk, sv) in zip(st.cache, st.spare):
        torch.index_select(ck[:, :, :span], 0, rows, out=sk[:, :, :span])
        torch.index_select(cv[:, :, :span], 0, rows, out=sv[:, :, :span])


def _drop_ended(st, beams: int) -> bool:
    """Keeps only the windows still decoding (one wait for the device): their rows, caches, cross-attention
    and what else the state holds for them. False when none is left."""
    import torch

    keep = st.active.nonzero().squeeze(1)  # waits for the step: what is known now, not what was queued
    if len(keep) == 0:
        return False
    k = beams
    rk = (keep[:, None] * k + torch.arange(k, device=keep.device)[None, :]).reshape(-1)
    st.ids, st.active, st.seqs, st.scores = st.ids[keep], st.active[keep], st.seqs[rk], st.scores[rk]
    if st.logits is not None:
        st.logits = st.logits[rk]
    if st.seen is not None:
        st.seen = st.seen[rk]
    st.cache = [(ck.index_select(0, rk), cv.index_select(0, rk)) for ck, cv in st.cache]
    new = torch.zeros_like if st.zeroed else torch.empty_like
    st.spare = [(new(ck), new(cv)) for ck, cv in st.cache]
    st.cross = [(xk.index_select(0, keep), xv.index_select(0, keep)) for xk, xv in st.cross]
    st.own = torch.arange(len(keep) * k, device=keep.device).view(len(keep), k)
    return True


def _still_decoding(st, alive_count: _AliveCount, compact_below: float, beams: int) -> bool:
    """After a step of the device searches: whether any window is still decoding, as far as the host knows
    without waiting (:class:`_AliveCount`); once those still decoding fall below ``compact_below`` of those
    held, the ended windows are dropped (:func:`_drop_ended`: one wait, and ``st`` holds new tensors)."""
    held = st.ids.shape[0]
    alive = alive_count(st.active, held)
    if alive == 0:
        return False
    if alive < compact_below * held:
        if not _drop_ended(st, beams):
            return False
        alive_count.drop_queued()
    return True


def beam_search_device(stack: WhisperDecoderStack, cross: list, prompts: list[list[int]], limits: list[int], *,
                       beams: int, eos: int, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                       suppress: tuple[int, ...] = (), begin_suppress: tuple[int, ...] = (),
                       compact_below: float | None = None) -> list[tuple[list[int], float, bool]]:
    """:func:`beam_search`'s search, results and arguments, with every choice made on the stack's device.

    Why: :func:`beam_search` brings each step's best continuations to the host and chooses there, so on a GPU
    each step waits for the one before it, and the GPU waits for the host's choice and its next ~300 kernel
    launches (49 % busy at 64 windows on an H100, BENCHMARKS.md, "The GPU check"). Here a step's choice is a
    few tensor operations queued behind the step (:class:`_EndedOnDevice`): the host runs ahead and nothing
    waits until the end. An ended window's rows keep running, scored -inf, until they are dropped: the host
    learns how many windows are still decoding from a copy that it reads only once it has arrived
    (:class:`_AliveCount`), and drops the ended windows (one wait) once the rest fall below ``compact_below``
    of those held, stopping once none is left."""
    import torch

    k = beams
    dev = stack.device
    if compact_below is None:
        compact_below = COMPACT_BELOW if dev.type != "cpu" else 1.0
    st = _start(stack, cross, prompts, limits, k, suppress, begin_suppress)
    plen, steps = st.plen, st.steps
    vocab = st.logits.shape[1]
    ended = _EndedOnDevice(st.n_win, k, steps, plen, st.limits, eos, dev)
    alive_count = _AliveCount(dev)
    n_t = torch.ones(1, dtype=torch.long, device=dev)  # the step number, on the device
    for n in range(1, steps + 1):
        cur = plen + n - 1
        w = st.ids.shape[0]
        _process_logits(st.logits, st.seqs, cur, n == 1, repetition_penalty, no_repeat_ngram_size, st.suppress,
                        st.begin)
        total = (torch.log_softmax(st.logits, -1) + st.scores[:, None]).view(w, k * vocab)
        st.logits = None  # used: a drop below need not keep it
        top_s, top_i = total.topk(2 * k, dim=1)
        nsrc, ntok, nscore, st.active = ended.choose(top_s, top_i, vocab, st.seqs, st.ids, st.active, n_t)
        if n == steps:  # every window has reached its limit
            break
        rows = torch.where(st.active[:, None], nsrc, st.own).reshape(-1)
        st.seqs = st.seqs.index_select(0, rows)
        st.seqs[:, cur] = ntok.reshape(-1)
        _reorder(st, rows, cur)
        st.cache, st.spare = st.spare, st.cache
        st.scores = torch.where(st.active[:, None], nscore, -math.inf).reshape(-1)
        n_t += 1
        if not _still_decoding(st, alive_count, compact_below, k):
            break
        st.logits = stack.step(st.seqs[:, cur:cur + 1], cur, st.cache, st.cross, k)
    return ended.results()


# the fixed-shape search's self-attention spans grow in steps of this many positions: one CUDA graph each
GRAPH_SPAN = 32


# how the graphed search captures: directly (CUDAGraph.capture_begin/end on its side stream) until that
# fails once in this process, then through torch.cuda.graph, which first waits for the device and empties the
# allocator's cache, each capture (8 to 10 a batch)
_DIRECT_CAPTURE = {"ok": True}


def _capture(fn, pool, stream):
    """A CUDA graph of what ``fn`` launches, sharing ``pool``, captured on ``stream`` (see
    :data:`_DIRECT_CAPTURE`)."""
    import torch

    if _DIRECT_CAPTURE["ok"]:
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                g.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    fn()
                finally:
                    g.capture_end()
            return g
        except Exception as e:  # noqa: BLE001 - the documented context manager below is the fallback
            _DIRECT_CAPTURE["ok"] = False
            log.warning("a direct CUDA graph capture failed (%s); capturing through torch.cuda.graph from now on",
                        e)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
        fn()
    return g


# the graphed search drops ended windows once those still decoding fall below this share of those held (on
# a GPU; each drop captures the remaining spans' graphs again; on a CPU at once, as the host search does)
GRAPH_COMPACT_BELOW = 0.5


def beam_search_graphed(stack: WhisperDecoderStack, cross: list, prompts: list[list[int]], limits: list[int], *,
                        beams: int, eos: int, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                        suppress: tuple[int, ...] = (), begin_suppress: tuple[int, ...] = (),
                        graphs: bool | None = None,
                        compact_below: float | None = None) -> list[tuple[list[int], float, bool]]:
    """:func:`beam_search`'s search, results and arguments, each step one CUDA graph on a GPU (``graphs``,
    default: on CUDA devices).

    Why: with every choice on the device (:func:`beam_search_device`) a step is still ~400 kernels that the
    host launches one by one, each with its Python around it; a CUDA graph launches them all at once. A graph
    replays fixed shapes at fixed addresses, so here every step is the same: the rows held run on (ended
    windows' scored -inf), the state lives in tensors updated in place, the step number is a tensor, the
    repetition penalty reads a per-row table of the tokens seen, the n-gram ban masks the n-grams not yet
    written, and the self-attention spans the cache's first L positions (masked after the step's own,
    :meth:`WhisperDecoderStack.step_at`), L growing by :data:`GRAPH_SPAN`. A step reads one of the two
    caches and writes the other (:func:`_reorder`), so each L has two graphs, one each way, each captured
    after a step run as it is (the warm-up the capture needs) and replayed for the steps after. The host counts the
    windows still decoding without waiting (:class:`_AliveCount`); once they fall below ``compact_below`` of
    those held (default :data:`GRAPH_COMPACT_BELOW` on a GPU, at once on a CPU) the ended windows are
    dropped (one wait) and the graphs captured again for the rest, and the search stops once none is left.
    Without ``graphs`` the same steps run one kernel at a time (on a CPU: the tests)."""
    import functools

    import torch

    k = beams
    dev = stack.device
    if graphs is None:
        graphs = dev.type == "cuda"
    if compact_below is None:
        compact_below = GRAPH_COMPACT_BELOW if dev.type != "cpu" else 1.0
    # what the steps update in place, held in one namespace so that dropping ended windows can replace it
    st = _start(stack, cross, prompts, limits, k, suppress, begin_suppress, zeroed=True)
    plen, steps = st.plen, st.steps
    length = plen + steps
    vocab = st.logits.shape[1]
    suppress_t, begin_t = st.suppress, st.begin
    if repetition_penalty != 1.0:  # the tokens each row holds, for the repetition penalty
        st.seen = torch.zeros(st.n_win * k, vocab, dtype=torch.bool, device=dev).scatter_(1, st.seqs[:, :plen], True)
    m = no_repeat_ngram_size if no_repeat_ngram_size <= length else 0  # none longer than a row is ever complete
    gram_at = torch.arange(length - m + 1, device=dev) if m else None  # each n-gram's first position
    back = torch.arange(m - 1, device=dev) if m else None
    ended = _EndedOnDevice(st.n_win, k, steps, plen, st.limits, eos, dev)
    n_t = torch.ones(1, dtype=torch.long, device=dev)  # the step number, on the device

    def step(first: bool, span: int, decode: bool) -> None:
        cur_t = n_t + (plen - 1)  # where this step's tokens go
        seqs, active = st.seqs, st.active
        lg = st.logits
        if st.seen is not None:
            r = repetition_penalty
            lg = torch.where(st.seen, torch.where(lg < 0, lg * r, lg / r), lg)
        if m:  # the n-grams written before cur_t whose first m-1 tokens are the row's last m-1
            grams = seqs.unfold(1, m, 1)
            tail = seqs.index_select(1, (cur_t - (m - 1) + back).clamp(min=0))
            hit = (gram_at <= cur_t - m)[None, :] & (grams[:, :, :m - 1] == tail[:, None, :]).all(-1)
            ban = torch.zeros(hit.shape, dtype=lg.dtype, device=dev).masked_fill_(hit, -math.inf)
            lg.scatter_add_(1, grams[:, :, m - 1], ban)
        if len(suppress_t):
            lg.index_fill_(1, suppress_t, -math.inf)
        if first and len(begin_t):
            lg.index_fill_(1, begin_t, -math.inf)
        w = st.ids.shape[0]
        total = (torch.log_softmax(lg, -1) + st.scores[:, None]).view(w, k * vocab)
        top_s, top_i = total.topk(2 * k, dim=1)
        nsrc, ntok, nscore, still = ended.choose(top_s, top_i, vocab, seqs, st.ids, active, n_t)
        active.copy_(still)
        if not decode:
            return
        rows = torch.where(active[:, None], nsrc, st.own).reshape(-1)
        seqs.copy_(seqs.index_select(0, rows))
        seqs.index_copy_(1, cur_t, ntok.reshape(-1, 1))
        if st.seen is not None:
            st.seen.copy_(st.seen.index_select(0, rows))
            st.seen.scatter_(1, ntok.reshape(-1, 1), True)
        _reorder(st, rows, span)  # into st.spare: the loop swaps the caches after the step
        st.scores.copy_(torch.where(active[:, None], nscore, -math.inf).reshape(-1))
        st.logits.copy_(stack.step_at(seqs.index_select(1, cur_t), cur_t, st.spare, st.cross, k, span))
        n_t.add_(1)

    def span_of(n: int) -> int:  # step n writes position plen + n - 1 and attends up to it
        return min(length, -(-(plen + n) // GRAPH_SPAN) * GRAPH_SPAN)

    alive_count = _AliveCount(dev)
    captured: dict = {}
    pool = torch.cuda.graph_pool_handle() if graphs else None  # one pool: no graph's memory outlives its replay
    side = None  # the stream the warm-ups and captures run on
    step(True, span_of(1), steps > 1)
    st.cache, st.spare = st.spare, st.cache
    for n in range(2, steps + 1):
        decode = n < steps
        span = span_of(n)
        key = (span, n % 2)  # a step reads one cache and writes the other: each span has a graph each way
        if graphs and decode and key in captured:
            captured[key].replay()
        elif graphs and decode:
            side = side or torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(False, span, True)  # this step, run as it is: the warm-up before the capture
            torch.cuda.current_stream().wait_stream(side)
            captured[key] = _capture(functools.partial(step, False, span, True), pool, side)  # recorded, not run
        else:
            step(False, span, decode)
        if not decode:
            break
        st.cache, st.spare = st.spare, st.cache
        ids = st.ids
        if not _still_decoding(st, alive_count, compact_below, k):
            break
        if st.ids is not ids:  # ended windows dropped: the graphs step the tensors just replaced
            captured.clear()
    return ended.results()


SEARCHES = {"host": beam_search, "device": beam_search_device, "graphed": beam_search_graphed}


def _mel_constants(fe, device):
    """The Hann window and the transposed mel filters of ``fe`` on ``device``, made once per extractor and
    device and kept on the extractor."""
    import torch

    cache = fe.__dict__.setdefault("_torch_constants", {})
    key = str(device)
    if key not in cache:
        filters = np.asarray(fe.mel_filters, dtype=np.float32)
        cache[key] = (torch.hann_window(fe.n_fft, device=device),
                      torch.from_numpy(np.ascontiguousarray(filters.T)).to(device))
    return cache[key]


def log_mel(fe, audios: list[np.ndarray], device):
    """Whisper's log-mel features of each segment, zero-padded to 30 s, computed on ``device`` with
    ``torch.stft``, as transformers' WhisperFeatureExtractor computes them in torch (``fe``: a
    :class:`~krasr_batch.engines.base.NumpyLogMel`, for its settings and mel filters). On a GPU this takes the
    feature work off the CPU cores that feed it: within 1e-3 of the numpy features (tests)."""
    import torch

    # the padded batch is built on the device: only the samples cross over, not 30 s of zeros a segment, and no
    # pinned host buffer is allocated a call (a large cudaHostAlloc costs more than the copy it speeds up)
    x = torch.zeros(len(audios), fe.n_samples, dtype=torch.float32, device=device)
    for i, a in enumerate(audios):
        n = min(len(a), fe.n_samples)
        if n:
            x[i, :n] = torch.from_numpy(np.ascontiguousarray(a[:n], dtype=np.float32)).to(device)
    window, filters_t = _mel_constants(fe, x.device)
    spec = torch.stft(x, fe.n_fft, fe.hop_length, window=window, return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = torch.clamp(filters_t @ power, min=1e-10).log10()
    mel = torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (mel + 4.0) / 4.0


class TorchBeamDecoder(Decoder):
    """One replica of the torch engine (module docstring); ``decode(inputs)`` as every engine's. Its batches
    mix languages (a prompt per window) and token limits (each window stops at its own, exactly)."""

    engine = "torch"
    mixed_languages = True

    def __init__(self, options: DecodeOptions, device: str = "auto", threads: int | None = None):
        import torch

        from krasr_batch.engines.encoder import TorchEncoder, cpu_compute_type
        device = resolve_device(device)
        super().__init__(options, device)
        t0 = time.perf_counter()
        folder = local_model_dir(options.model)
        require_safetensors(folder, options.model)
        self._load_processor(numpy_features=True, folder=folder)
        gpu = device == "cuda"
        allowed = ("float16", "bfloat16", "float32") if gpu else ("bfloat16", "float32")
        if options.dtype == "auto":
            self.compute_type = "float16" if gpu else cpu_compute_type()
        elif options.dtype in allowed:
            self.compute_type = options.dtype
        else:
            raise RuntimeError(f"--engine torch runs in {', '.join(allowed)} on a {'GPU' if gpu else 'CPU'}, "
                               f"not {options.dtype}")
        if threads and not gpu:
            torch.set_num_threads(threads)
        self.encoder = TorchEncoder(folder, self.compute_type, threads, device=device)
        self.stack = WhisperDecoderStack(folder, self.compute_type, device=device)
        self._init_prompt()
        gc = self.generation_config
        self.suppress = tuple(getattr(gc, "suppress_tokens", None) or ())
        self.begin_suppress = tuple(getattr(gc, "begin_suppress_tokens", None) or ())
        self.batch_size = default_batch_size(options.batch_size, device, self.engine)
        self.precision = self.compute_type
        self.features_on_device = gpu  # log-mel with torch.stft on the GPU (log_mel), else numpy on the CPU
        # the beam search, all with the same results: "host" (beam_search: each step's choice made on the host),
        # "device" (beam_search_device: every choice on the device, no wait a step) or "graphed"
        # (beam_search_graphed: each step one CUDA graph on a GPU); "host" until a GPU has measured the others
        self.search = "host"
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s with the torch engine (%s) in %.1f s", folder, self.compute_type, self.load_s)

    continues_cut_clips = True

    @classmethod
    def _group_key(cls, x: SegmentInput) -> tuple:
        # one group: every window stops at its own limit and carries its own prompt
        return (x.language is None,)

    def _generate_batch(self, batch: list[SegmentInput]) -> list[SegmentOutput]:
        import torch

        o = self.options
        t0 = time.perf_counter()
        dev = self.stack.device
        with torch.inference_mode():
            if not self.features_on_device:
                feats = torch.from_numpy(self._features([x.audio for x in batch], "np")["input_features"])
            else:  # on the GPU: the CPU cores feed it audio, not features
                feats = log_mel(self.feature_extractor, [x.audio for x in batch], dev)
            encoded = self.encoder.encode(feats)
            cross = self.stack.cross(encoded)
            del encoded
            sot = self.generation_config.decoder_start_token_id
            # the first step (after <|startoftranscript|>) gives language scores and the no-speech probability
            first = self.stack.step(torch.full((len(batch), 1), sot, device=dev), 0,
                                    self.stack.new_cache(len(batch), 1), cross, 1)
            first_lp = torch.log_softmax(first, -1).cpu().numpy()
            codes = [language_code(x.language) if x.language is not None else self.detect_language(lp)[0]
                     for x, lp in zip(batch, first_lp)]
            hyps = self._search(cross, [self._prompt(c) for c in codes], [x.max_new_tokens for x in batch])
            budgets = self._continue_cut(batch, cross, codes, hyps)
            words = self._align(cross, codes, [t for t, _, _ in hyps], batch) if o.word_timestamps else None
        decode_s = time.perf_counter() - t0
        out = []
        for i, (c, lp, (tokens, score, done)) in enumerate(zip(codes, first_lp, hyps)):
            n = len(tokens)
            # Whisper's avg_logprob: over the text tokens and end-of-text
            avg = None if not np.isfinite(score) else float(score / (n + 1) if done else score / max(n, 1))
            no_speech = float(np.exp(lp[self.no_speech_id])) if self.no_speech_id is not None else None
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            out.append(SegmentOutput(text, c, n, not done, decode_s, len(batch), avg, no_speech,
                                     self.language_prob(lp, c), words[i] if words is not None else None,
                                     budgets.get(i)))
        return out

    def _search(self, cross: list, prompts: list[list[int]], limits: list[int], begin: bool = True):
        """The replica's search (:data:`SEARCHES`) with the card's settings; ``begin``: the text starts here
        (its begin-suppressed tokens banned at the first step), False where the prompts end in text."""
        o = self.options
        return SEARCHES[self.search](
            self.stack, cross, prompts, limits, beams=o.beams, eos=self.eos, repetition_penalty=o.repetition_penalty,
            no_repeat_ngram_size=o.no_repeat_ngram_size, suppress=self.suppress,
            begin_suppress=self.begin_suppress if begin else ())

    def _continue_cut(self, batch: list[SegmentInput], cross: list, codes: list[str], hyps: list) -> dict[int, int]:
        """Continue, in place in ``hyps``, the clips their card limit cut short with real text (Decoder.decode) to
        their "fit" budget: the cut tokens join the prompt of a new search over the same cross-attention keys
        and values, so the text is the card's call and what follows it. Returns each continued row's budget."""
        import torch

        budgets = self._going_on(batch, [not done for _, _, done in hyps],
                                 lambda i: self.tokenizer.decode(hyps[i][0], skip_special_tokens=True).strip())
        by_length: dict[int, list[int]] = defaultdict(list)  # a search's prompts are of one length
        for i in budgets:
            by_length[len(hyps[i][0])].append(i)
        for n, rows in by_length.items():
            keep = torch.tensor(rows, device=self.stack.device)
            sub = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in cross]
            more = self._search(sub, [self._prompt(codes[i]) + hyps[i][0] for i in rows],
                                [budgets[i] - n for i in rows], begin=False)
            for i, (tokens, score, done) in zip(rows, more):  # summed log-probabilities add up
                hyps[i] = (hyps[i][0] + tokens, hyps[i][1] + score, done)
        if budgets:
            log.debug("continued %d clip(s) their card limit cut short to the fit budget", len(budgets))
        return budgets

    def _align(self, cross: list, codes: list[str], texts: list[list[int]],
               batch: list[SegmentInput]) -> list[tuple[Word, ...]]:
        """Each window's words (engines/timing.py): one teacher-forced pass of the windows with text over
        their prompt, text and end-of-text (padded with end-of-text: the pass is causal), keeping the
        alignment heads' cross-attention weights, then :func:`words_from_weights`."""
        import torch

        out: list[tuple[Word, ...]] = [()] * len(texts)
        idx = [i for i, t in enumerate(texts) if t]
        if not idx:
            return out
        prompts = [self._prompt(codes[i]) for i in idx]
        # a window whose text filled the model's positions has no place for end-of-text: it goes without it
        # (that row only enters the normalisation, not the rows DTW aligns)
        width = min(max(len(p) + len(texts[i]) + 1 for p, i in zip(prompts, idx)), self.stack.max_positions)
        rows = [(p + texts[i] + [self.eos] * (width - len(p) - len(texts[i])))[:width] for p, i in zip(prompts, idx)]
        dev = self.stack.device
        sub = cross
        if len(idx) < len(texts):  # the windows with text only
            keep = torch.tensor(idx, device=dev)
            sub = [(xk.index_select(0, keep), xv.index_select(0, keep)) for xk, xv in cross]
        hidden, weights = self.stack.teacher_forced(torch.tensor(rows, device=dev), sub, self.alignment_heads)
        for r, (i, p) in enumerate(zip(idx, prompts)):
            text, start = texts[i], len(p)
            logits = _apply(self.stack.logits, hidden[r, start - 1:start + len(text) - 1]).float()[:, :self.eos]
            probs = torch.softmax(logits, dim=-1).cpu().numpy()
            token_p = [float(probs[k, t]) if t < self.eos else 0.0 for k, t in enumerate(text)]
            audio = batch[i].audio
            frames = num_frames(len(audio)) // 2
            out[i] = tuple(words_from_weights(weights[r, :, :, :frames], start, text, token_p, self._word_decode,
                                              self.eos, codes[i], len(audio) / SAMPLE_RATE))
        return out
