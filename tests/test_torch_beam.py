"""The torch engine (engines/torch_beam.py): its decoder equals transformers' on the same weights, its beam
search gives CTranslate2's tokens in float32, a window's result does not depend on the batch it shares, each
window stops at its own limit, and ``--engine auto`` picks it on CPUs with bfloat16 units."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from krasr_batch.audio import load_audio
from krasr_batch.engines import SegmentInput, choose_engine, load_decoder, max_new_tokens_for
from krasr_batch.engines import encoder as encoder_module
from krasr_batch.engines.base import CT2_CPU_BATCH
from krasr_batch.engines.encoder import TorchEncoder
from krasr_batch.engines.torch_beam import (
    WhisperDecoderStack,
    beam_search,
    beam_search_device,
    beam_search_graphed,
    log_mel,
)
from krasr_batch.settings import DecodeOptions

from .conftest import read_jsonl, run_cli, write_manifest

SETTINGS = dict(beams=3, repetition_penalty=1.12, no_repeat_ngram_size=4)


def _config(model) -> dict:
    return json.loads((model / "generation_config.json").read_text())


def _prompt(model, lang: str = "kk") -> list[int]:
    gc = _config(model)
    return [gc["decoder_start_token_id"], gc["lang_to_id"][f"<|{lang}|>"], gc["task_to_id"]["transcribe"],
            gc["no_timestamps_token_id"]]


def _encoded(model, audios: list[np.ndarray]) -> np.ndarray:
    from krasr_batch.engines.base import NumpyLogMel

    feats = NumpyLogMel.from_pretrained(str(model))(audios)["input_features"]
    return TorchEncoder(model, "float32")(feats)


def _search(model, stack, encoded, prompts, limits, search=beam_search, **kw):
    gc = _config(model)
    with torch.inference_mode():
        cross = stack.cross(torch.from_numpy(encoded).to(stack.dtype))
        return search(stack, cross, prompts, limits, eos=gc["eos_token_id"], suppress=gc["suppress_tokens"],
                      begin_suppress=gc["begin_suppress_tokens"], **{**SETTINGS, **kw})


def _clips(corpus, n: int, step: int = 5) -> list[np.ndarray]:
    return [load_audio(str(corpus / c["path"])) for c in read_jsonl(corpus / "clips.jsonl")[::step][:n]]


def test_the_decoder_equals_transformers_decoder(tiny_model):
    """Prompt and cached single steps, beams sharing a window's cross-attention: transformers' logits."""
    from transformers import WhisperForConditionalGeneration

    ref = WhisperForConditionalGeneration.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    stack = WhisperDecoderStack(tiny_model, "float32")
    rng = np.random.default_rng(0)
    encoded = torch.from_numpy(rng.normal(0, 1, (2, 1500, ref.config.d_model)).astype(np.float32))
    prompt = torch.tensor([_prompt(tiny_model)] * 6)  # 2 windows x 3 beams
    tokens = torch.cat([prompt, torch.from_numpy(rng.integers(0, 50000, (6, 3)))], 1)
    with torch.inference_mode():
        expected = ref(encoder_outputs=(encoded.repeat_interleave(3, 0),), decoder_input_ids=tokens).logits
        cross = stack.cross(encoded)
        cache = stack.new_cache(6, 16)
        got = [stack.step(tokens[:, :4], 0, cache, cross, 3)]
        got += [stack.step(tokens[:, p:p + 1], p, cache, cross, 3) for p in range(4, 7)]
    for k, g in enumerate(got):
        np.testing.assert_allclose(g.numpy(), expected[:, 3 + k].numpy(), atol=2e-4, rtol=2e-4)


def test_reduced_precision_gives_float32_logits_as_transformers_generate_takes_them(tiny_model):
    """transformers' generate() takes each step's logits in float32 before the logits processors; so does the
    stack in bfloat16: the repetition penalty, n-gram ban and log-softmax run on float32 logits (on a CPU the
    scatters into bfloat16 cost 1.2-1.8 ms at 48 rows, into float32 0.03-0.08 ms), and the logits are its
    bfloat16 product, widened."""
    stack = WhisperDecoderStack(tiny_model, "bfloat16")
    encoded = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (1, 1500, stack.d)).astype(np.float32))
    prompt = torch.tensor([_prompt(tiny_model)] * 3)
    with torch.inference_mode():
        cross = stack.cross(encoded.to(torch.bfloat16))
        cache = stack.new_cache(3, 8, zeroed=True)
        first = stack.step(prompt, 0, cache, cross, 3)
        fixed = stack.step_at(prompt[:, -1:], torch.tensor([4]), cache, cross, 3, 8)
    assert first.dtype == fixed.dtype == torch.float32
    assert torch.equal(first, first.to(torch.bfloat16).float())  # nothing but the bfloat16 product, widened


class _MatmulDtypes(torch.overrides.TorchFunctionMode):
    """Records the operand dtypes of every ``torch.matmul`` inside it."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.matmul:
            self.seen.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


def test_a_cpu_bfloat16_stack_attends_over_a_float32_cache(tiny_model):
    """On a CPU the self-attention's keys and values are held in float32 whatever the stack's dtype: oneDNN's
    bfloat16 product of one query with the cache is 2-3x slower than float32's and keeps a primitive, with
    memory, for every cache length (a whisper-small replica kept 7.5 GB after 360 steps). The cross-attention and
    the linear layers stay in bfloat16; the step and the fixed-shape step agree; a GPU stack keeps its dtype."""
    stack = WhisperDecoderStack(tiny_model, "bfloat16")
    assert WhisperDecoderStack(tiny_model, "bfloat16", fused=True).new_cache(3, 8)[0][0].dtype == torch.bfloat16
    encoded = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (1, 1500, stack.d)).astype(np.float32))
    tokens = torch.tensor([_prompt(tiny_model) + [50, 60]] * 3)
    with torch.inference_mode():
        cross = stack.cross(encoded.to(torch.bfloat16))
        cache, fixed_cache = stack.new_cache(3, 8), stack.new_cache(3, 8, zeroed=True)
        assert {t.dtype for kv in cache + fixed_cache for t in kv} == {torch.float32}
        stack.step(tokens[:, :4], 0, cache, cross, 3)
        stack.step(tokens[:, :4], 0, fixed_cache, cross, 3)
        with _MatmulDtypes() as mm:
            one = stack.step(tokens[:, 4:5], 4, cache, cross, 3)
        fixed = stack.step_at(tokens[:, 4:5], torch.tensor([4]), fixed_cache, cross, 3, 8)
        again = stack.step_at(tokens[:, 5:6], torch.tensor([5]), fixed_cache, cross, 3, 8)
        after = stack.step(tokens[:, 5:6], 5, cache, cross, 3)
    f32, bf16 = (torch.float32,) * 2, (torch.bfloat16,) * 2
    assert mm.seen.count(f32) == 2 * stack.layers and mm.seen.count(bf16) == 2 * stack.layers, mm.seen
    torch.testing.assert_close(fixed, one, atol=1e-2, rtol=1e-2)  # masked positions add exact zeros
    torch.testing.assert_close(again, after, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fused", [False, True], ids=["cpu-attention", "gpu-attention"])
def test_the_teacher_forced_pass_gives_transformers_cross_attention(tiny_model, fused):
    """Word timing's pass (WhisperDecoderStack.teacher_forced): the chosen heads' cross-attention weights and
    the final hidden states of transformers' decoder (eager attention) over the same tokens."""
    from transformers import WhisperForConditionalGeneration

    ref = WhisperForConditionalGeneration.from_pretrained(str(tiny_model), dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    stack = WhisperDecoderStack(tiny_model, "float32", fused=fused)
    rng = np.random.default_rng(1)
    encoded = torch.from_numpy(rng.normal(0, 1, (2, 1500, ref.config.d_model)).astype(np.float32))
    tokens = torch.cat([torch.tensor([_prompt(tiny_model)] * 2), torch.from_numpy(rng.integers(0, 50000, (2, 9)))], 1)
    heads = [(1, 2), (0, 1), (1, 0)]  # any order, several in one layer
    with torch.inference_mode():
        out = ref.model.decoder(input_ids=tokens, encoder_hidden_states=encoded, output_attentions=True)
        hidden, weights = stack.teacher_forced(tokens, stack.cross(encoded), heads)
    want = torch.stack([out.cross_attentions[layer][:, h] for layer, h in heads], 1)
    np.testing.assert_allclose(weights.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(hidden.numpy(), out.last_hidden_state.numpy(), atol=2e-4, rtol=2e-4)


def test_float32_beam_search_gives_ctranslate2s_tokens(base_model, corpus):
    """The same search as CTranslate2's (logits processing, candidates, stopping, length-normalised choice):
    on real speech and the real weights, in float32, the same tokens on nearly every clip."""
    ct2 = pytest.importorskip("ctranslate2")
    from krasr_batch.engines.ctranslate2 import converted_model, ct2_max_length

    audios = _clips(corpus, 8)
    encoded = _encoded(base_model, audios)
    limits = [max_new_tokens_for(len(a) / 16000) for a in audios]
    prompts = [_prompt(base_model)] * len(audios)
    mine = _search(base_model, WhisperDecoderStack(base_model, "float32"), encoded, prompts, limits)
    model = ct2.models.Whisper(str(converted_model(str(base_model))), device="cpu", compute_type="float32",
                               intra_threads=1)
    theirs = [model.generate(ct2.StorageView.from_array(encoded[i:i + 1]), [p], max_length=ct2_max_length(n, 4),
                             beam_size=3, repetition_penalty=1.12, no_repeat_ngram_size=4)[0].sequences_ids[0]
              for i, (p, n) in enumerate(zip(prompts, limits))]
    same = sum(m[0] == t for m, t in zip(mine, theirs))
    assert same >= 6, [(len(m[0]), len(t)) for m, t in zip(mine, theirs)]


@pytest.mark.parametrize("fused", [False, True], ids=["cpu-attention", "gpu-attention"])
def test_a_window_decodes_the_same_in_any_batch(tiny_model, fused):
    """Windows of several languages and limits share a batch, leave it as they end (their cross-attention
    keys and values held, then dropped), and reorder their beams' caches: each one's result is the one it gets
    alone. ``fused``: the GPU's attention (scaled_dot_product_attention), run here on the CPU."""
    rng = np.random.default_rng(3)
    audios = [rng.normal(0, 0.1, 16000 * d).astype(np.float32) for d in (3, 8, 20, 5, 12)]
    encoded = _encoded(tiny_model, audios)
    prompts = [_prompt(tiny_model, lang) for lang in ("kk", "ru", "kk", "en", "ru")]
    limits = [5, 40, 17, 1, 60]  # with 0.75 (a GPU's default): 4 of 5 left after the first ends: held; 3: dropped
    stack = WhisperDecoderStack(tiny_model, "float32", fused=fused)
    together = _search(tiny_model, stack, encoded, prompts, limits, compact_below=0.75)
    assert _search(tiny_model, stack, encoded, prompts, limits) == together  # the CPU's default: dropped at once
    for i in range(len(audios)):
        alone = _search(tiny_model, stack, encoded[i:i + 1], prompts[i:i + 1], limits[i:i + 1])[0]
        assert together[i][0] == alone[0] and together[i][2] == alone[2]
        assert together[i][1] == pytest.approx(alone[1], abs=1e-3)
    for (tokens, _, ended), n in zip(together, limits):
        assert len(tokens) <= n and (ended or len(tokens) == n)  # the end-of-text step counts toward the limit


def _same_results(got, want):
    assert [(g[0], g[2]) for g in got] == [(w[0], w[2]) for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["cpu-attention", "gpu-attention"])
@pytest.mark.parametrize("compact_below", [None, 0.75, 0.0], ids=["at-once", "gpu-default", "never"])
def test_the_device_search_gives_the_host_searchs_results(tiny_model, monkeypatch, fused, compact_below):
    """beam_search_device (every choice on the device, ended windows' rows kept running until dropped) against
    beam_search: the same tokens, ended flags and scores, whenever the ended windows are dropped. Nothing
    in its steps waits for the device but the places it names: the start (``_start``, ``_EndedOnDevice``), the
    count of windows still decoding (with the drop of ended ones) and the results."""
    from krasr_batch.engines import torch_beam

    for owner, name in ((torch_beam, "_start"), (torch_beam, "_still_decoding"),
                        (torch_beam._EndedOnDevice, "__init__"), (torch_beam._EndedOnDevice, "results")):
        monkeypatch.setattr(owner, name, _NoHostReads.allowing(getattr(owner, name)))

    def guarded(*args, **kw):
        with _NoHostReads():
            return beam_search_device(*args, **kw)
    rng = np.random.default_rng(3)
    audios = [rng.normal(0, 0.1, 16000 * d).astype(np.float32) for d in (3, 8, 20, 5, 12, 2)]
    encoded = _encoded(tiny_model, audios)
    prompts = [_prompt(tiny_model, lang) for lang in ("kk", "ru", "kk", "en", "ru", "kk")]
    limits = [5, 40, 17, 1, 60, 2]
    stack = WhisperDecoderStack(tiny_model, "float32", fused=fused)
    want = _search(tiny_model, stack, encoded, prompts, limits)
    got = _search(tiny_model, stack, encoded, prompts, limits, search=guarded, compact_below=compact_below)
    _same_results(got, want)
    for (tokens, _, ended), n in zip(got, limits):
        assert len(tokens) <= n and (ended or len(tokens) == n)


@pytest.mark.parametrize("fused", [False, True], ids=["cpu-attention", "gpu-attention"])
@pytest.mark.parametrize("compact_below", [None, 0.5, 0.0], ids=["at-once", "gpu-default", "never"])
def test_the_fixed_shape_search_gives_the_host_searchs_results(tiny_model, fused, compact_below):
    """beam_search_graphed's steps (fixed shapes: ended windows' rows kept until dropped, the self-attention
    over a masked span, the penalty from a table of seen tokens, the n-gram ban over masked n-grams), run one
    kernel at a time here as a GPU's CUDA graph replays them: beam_search's results."""
    rng = np.random.default_rng(3)
    audios = [rng.normal(0, 0.1, 16000 * d).astype(np.float32) for d in (3, 8, 20, 5, 12, 2)]
    encoded = _encoded(tiny_model, audios)
    prompts = [_prompt(tiny_model, lang) for lang in ("kk", "ru", "kk", "en", "ru", "kk")]
    limits = [5, 40, 17, 1, 60, 2]  # 60 + the prompt: three self-attention spans
    stack = WhisperDecoderStack(tiny_model, "float32", fused=fused)
    want = _search(tiny_model, stack, encoded, prompts, limits)
    got = _search(tiny_model, stack, encoded, prompts, limits, search=beam_search_graphed, compact_below=compact_below)
    _same_results(got, want)
    one = _search(tiny_model, stack, encoded[1:2], prompts[1:2], [1], search=beam_search_graphed)  # one step
    _same_results(one, _search(tiny_model, stack, encoded[1:2], prompts[1:2], [1]))


def _addresses(st) -> dict:
    """Where each tensor of a graphed search's state lives: a CUDA graph reads and writes those addresses."""
    out = {}
    for name, value in vars(st).items():
        if isinstance(value, torch.Tensor):
            out[name] = value.data_ptr()
        elif isinstance(value, list) and value and isinstance(value[0], tuple):  # caches, cross-attention
            out[name] = [t.data_ptr() for pair in value for t in pair]
    return out


class _ReplayedCalls:
    """Stands in for a CUDA graph on the CPU: nothing runs at capture, each replay runs the captured call,
    and only where the search's state holds the tensors it held at capture (a graph replays addresses)."""

    def __init__(self, fn, counts):
        self.fn, self.counts = fn, counts
        cells = [c.cell_contents for c in fn.func.__closure__]
        self.st = next(c for c in cells if hasattr(c, "spare"))
        self.addresses = _addresses(self.st)
        counts["captured"] += 1

    def replay(self):
        assert _addresses(self.st) == self.addresses, "a replay would step other tensors than its capture"
        self.counts["replayed"] += 1
        with _NoHostReads():
            self.fn()


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on what a CUDA graph cannot hold: a value brought to the host (``item``, ``tolist``, a tensor's
    truth, ``cpu``), a result whose shape depends on values (``nonzero``, a boolean mask's selection), each
    of which waits for the device, or host data copied in (``torch.tensor``); during a capture each stops it."""

    T = torch.Tensor
    WAITS = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.cpu, T.numpy, T.nonzero,
             torch.nonzero, torch.argwhere, T.masked_select, torch.masked_select, torch.unique, T.unique,
             torch.tensor, torch.as_tensor, torch.from_numpy}

    allowed = 0  # inside a function the search names as one that waits (see allowing)

    @classmethod
    def allowing(cls, fn):
        """``fn``, free to wait (a search's declared wait)."""
        def free(*args, **kw):
            cls.allowed += 1
            try:
                return fn(*args, **kw)
            finally:
                cls.allowed -= 1
        return free

    def __torch_function__(self, func, types, args=(), kwargs=None):
        waits = func in self.WAITS or (func is torch.where and len(args) == 1)
        if func in (self.T.__getitem__, self.T.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            waits = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        assert not waits or self.allowed, f"{getattr(func, '__name__', func)} inside a step waits for the device"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("compact_below", [0.5, 0.0], ids=["dropped-at-half", "never-dropped"])
def test_the_graphed_search_replays_what_it_captured(tiny_model, monkeypatch, compact_below):
    """beam_search_graphed's loop with graphs on (warm-up step, capture, replays; drops that discard the
    graphs), on the CPU: CUDA's streams are no-ops and a graph is a call replayed, never run at capture, as a
    CUDA graph's capture runs nothing, and a replay that brings a value to the host fails. The results are
    beam_search's, and most steps are replays."""
    import contextlib

    from krasr_batch.engines import torch_beam

    class Stream:
        def wait_stream(self, other):
            pass

    counts = {"captured": 0, "replayed": 0}
    monkeypatch.setattr(torch_beam, "_capture", lambda fn, pool, stream: _ReplayedCalls(fn, counts))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    rng = np.random.default_rng(3)
    audios = [rng.normal(0, 0.1, 16000 * d).astype(np.float32) for d in (3, 8, 20, 5, 12, 2)]
    encoded = _encoded(tiny_model, audios)
    prompts = [_prompt(tiny_model, lang) for lang in ("kk", "ru", "kk", "en", "ru", "kk")]
    limits = [5, 40, 17, 1, 60, 2]
    stack = WhisperDecoderStack(tiny_model, "float32")
    want = _search(tiny_model, stack, encoded, prompts, limits)
    got = _search(tiny_model, stack, encoded, prompts, limits, search=beam_search_graphed, graphs=True,
                  compact_below=compact_below)
    _same_results(got, want)
    # 60 steps + a 4-token prompt: spans 32 and 64, each captured twice (a step reads one cache and writes
    # the other, each way); dropping at half (after step 17, 2 of 6 windows left; after step 40, 1 of 2 is
    # not below half) captures span 32 again
    assert counts["captured"] == (4 if compact_below == 0.0 else 6), counts
    assert counts["replayed"] >= 50, counts


@pytest.mark.parametrize("beams, repetition_penalty, ngram", [(1, 1.12, 4), (5, 1.12, 4), (3, 1.0, 0), (2, 0.9, 1)])
def test_the_device_searches_at_other_settings(tiny_model, beams, repetition_penalty, ngram):
    """Other --beams, no penalty or one below 1, no n-gram ban or a ban of single tokens: the device and
    graphed searches still give beam_search's results."""
    rng = np.random.default_rng(7)
    audios = [rng.normal(0, 0.1, 16000 * d).astype(np.float32) for d in (3, 8, 5)]
    encoded = _encoded(tiny_model, audios)
    prompts = [_prompt(tiny_model, lang) for lang in ("kk", "ru", "en")]
    stack = WhisperDecoderStack(tiny_model, "float32")
    kw = dict(beams=beams, repetition_penalty=repetition_penalty, no_repeat_ngram_size=ngram)
    runs = [_search(tiny_model, stack, encoded, prompts, [7, 30, 12], search=search, **kw)
            for search in (beam_search, beam_search_device, beam_search_graphed)]
    _same_results(runs[1], runs[0])
    _same_results(runs[2], runs[0])


@pytest.fixture(scope="module")
def real_speech(base_model, corpus):
    """Eight clips encoded by whisper-base, their prompts and limits, and the host search's results (once for
    the searches compared with it)."""
    audios = _clips(corpus, 8, step=3)
    encoded = _encoded(base_model, audios)
    limits = [max_new_tokens_for(len(a) / 16000) for a in audios]
    prompts = [_prompt(base_model, lang) for lang in ("kk", "ru") * 4]
    stack = WhisperDecoderStack(base_model, "float32")
    want = _search(base_model, stack, encoded, prompts, limits)
    assert any(ended for _, _, ended in want)  # end-of-text is exercised, not only the limits
    return stack, encoded, prompts, limits, want


@pytest.mark.parametrize("search, compact_below", [(beam_search_device, None), (beam_search_graphed, None),
                                                   (beam_search_graphed, 0.0)],
                         ids=["device", "graphed", "graphed-never-dropped"])
def test_the_device_searches_on_real_speech(base_model, real_speech, search, compact_below):
    """On real speech and weights, where hypotheses end at end-of-text at different steps and a window may
    end before its limit with all its beams: the host search's results, window for window."""
    stack, encoded, prompts, limits, want = real_speech
    _same_results(_search(base_model, stack, encoded, prompts, limits, search=search, compact_below=compact_below),
                  want)


def test_the_engine_runs_either_search(tiny_model):
    dec = load_decoder(DecodeOptions(model=str(tiny_model), engine="torch", dtype="float32"), "cpu", 1)
    assert dec.search == "host"
    rng = np.random.default_rng(4)
    inputs = [SegmentInput(rng.normal(0, 0.1, 16000 * d).astype(np.float32), lang, n)
              for d, lang, n in [(3, "kazakh", 12), (9, "russian", 30), (2, None, 8)]]
    want = dec.decode(inputs)
    for search in ("device", "graphed"):
        dec.search = search
        got = dec.decode(inputs)
        assert [(o.text, o.num_tokens, o.truncated) for o in got] == [(o.text, o.num_tokens, o.truncated) for o in want]
        assert [o.avg_logprob for o in got] == pytest.approx([o.avg_logprob for o in want], abs=1e-4)


def test_gpu_log_mel_equals_the_numpy_features(tiny_model):
    """log_mel (torch.stft, as a GPU replica computes its features) against NumpyLogMel, on the CPU here."""
    from krasr_batch.engines.base import NumpyLogMel

    rng = np.random.default_rng(5)
    audios = [rng.normal(0, 0.1, int(16000 * d)).astype(np.float32) for d in (0.3, 4.2, 29.9, 31.0)]
    audios.append(np.zeros(0, np.float32))
    fe = NumpyLogMel.from_pretrained(str(tiny_model))
    want = fe([a if len(a) else np.zeros(1, np.float32) for a in audios])["input_features"]
    got = log_mel(fe, audios, "cpu").numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_the_gpu_feature_path_decodes_the_same_on_the_cpu(tiny_model):
    """A GPU replica's path (features by log_mel on the device, the fused attention), run on the CPU: the
    same text as the CPU path."""
    dec = load_decoder(DecodeOptions(model=str(tiny_model), engine="torch", dtype="float32"), "cpu", 1)
    rng = np.random.default_rng(2)
    inputs = [SegmentInput(rng.normal(0, 0.1, 16000 * d).astype(np.float32), lang, n)
              for d, lang, n in [(3, "kazakh", 12), (9, "russian", 30), (2, None, 8)]]
    want = dec.decode(inputs)
    dec.features_on_device = True
    dec.stack = WhisperDecoderStack(tiny_model, "float32", fused=True)
    got = dec.decode(inputs)
    assert [o.text for o in got] == [o.text for o in want]
    assert [o.language for o in got] == [o.language for o in want]


def test_engine_limits_signals_and_batches(tiny_model):
    # --token-limit card: under "fit" a clip that random weights run to its limit goes on to the budget
    dec = load_decoder(DecodeOptions(model=str(tiny_model), engine="torch", dtype="float32", token_limit="card"),
                       "cpu", 1)
    assert dec.engine == "torch" and dec.compute_type == "float32" and dec.batch_size == CT2_CPU_BATCH
    rng = np.random.default_rng(1)
    audio = rng.normal(0, 0.1, 16000 * 4).astype(np.float32)
    inputs = [SegmentInput(audio, lang, n, exact_limit=exact) for lang, n, exact in
              [("kazakh", 1, True), ("russian", 3, True), ("kazakh", 7, False), (None, 40, True), ("kazakh", 2, False)]]
    out = dec.decode(inputs)
    # one batch for the forced languages whatever their limits; detection has its own
    assert [o.batch_size for o in out] == [4, 4, 4, 1, 4]
    assert [o.language for o in out][:3] == ["kk", "ru", "kk"] and out[3].language in dec.token_by_code
    for o, x in zip(out, inputs):
        assert o.num_tokens <= x.max_new_tokens and o.truncated == (o.num_tokens == x.max_new_tokens)
        assert 0 <= o.no_speech_prob <= 1 and 0 < o.language_prob <= 1 and o.decode_s > 0
        assert o.avg_logprob is None or o.avg_logprob <= 0
    assert sum(o.truncated for o in out) >= 3  # random weights rarely end a row


def test_engine_refuses_what_it_cannot_do(tiny_model):
    for dtype in ("int8", "float16"):  # float16 is for GPUs: CPUs have no float16 matrix units
        with pytest.raises(RuntimeError, match="bfloat16, float32 on a CPU"):
            load_decoder(DecodeOptions(model=str(tiny_model), engine="torch", dtype=dtype), "cpu", 1)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            load_decoder(DecodeOptions(model=str(tiny_model), engine="torch"), "cuda", 1)


def test_auto_picks_it_on_cpus_with_bfloat16_units(monkeypatch, tiny_model):
    monkeypatch.setattr(encoder_module, "cpu_has_bf16_matmul", lambda: True)
    assert choose_engine(use_gpu=False)[0] == "torch"
    assert choose_engine(use_gpu=False, dtype="int8")[0] == "ctranslate2"
    assert choose_engine(use_gpu=False, dtype="bfloat16")[0] == "torch"
    assert choose_engine(use_gpu=True)[0] == "torch"
    dec = load_decoder(DecodeOptions(model=str(tiny_model)), "cpu", 1)
    assert dec.engine == "torch" and dec.compute_type == "bfloat16"
    monkeypatch.setattr(encoder_module, "cpu_has_bf16_matmul", lambda: False)
    assert choose_engine(use_gpu=False)[0] == "ctranslate2"


def test_a_torch_replica_imports_neither_transformers_nor_ctranslate2(tiny_model):
    """Each is seconds of a replica's start (transformers' Whisper modeling 3.7 s here); the engine reads the
    tokenizer, generation config and weights itself."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from krasr_batch.engines import SegmentInput, load_decoder; "
            "from krasr_batch.settings import DecodeOptions; "
            f"d = load_decoder(DecodeOptions(model={str(tiny_model)!r}, engine='torch'), 'cpu', 1); "
            "d.decode([SegmentInput(np.zeros(16000, np.float32), 'kazakh', 5)]); "
            "print(sorted(m for m in ('transformers', 'ctranslate2') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


@pytest.mark.e2e
def test_run_with_the_torch_engine(tmp_path, corpus, tiny_model):
    rows = read_jsonl(corpus / "clips.jsonl")[:3] + read_jsonl(corpus / "long.jsonl")[:1]
    manifest = write_manifest(tmp_path / "m.jsonl", rows, base=corpus)
    out = tmp_path / "out"
    r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--engine", "torch",
                 "--num-cpus", "2", "--no-progress"])
    assert r.returncode in (0, 3), r.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["decode"]["engine"] == "torch"
    files = pads.dataset(out / "files", format="parquet").to_table().to_pylist()
    assert sorted(f["file_id"] for f in files) == sorted(x["id"] for x in rows)
    assert all(f["status"] == "ok" for f in files)
    segs = pads.dataset(out / "segments", format="parquet").to_table().to_pylist()
    assert len(segs) > len(rows) and all(s["num_tokens"] <= s["max_new_tokens"] for s in segs)


@pytest.mark.parametrize("engine", ["torch", "ctranslate2"])
def test_the_drivers_model_check_imports_no_transformers_for_a_local_folder(tiny_model, engine):
    """The check runs on the driver while the embedded Ray starts on the same cores: it reads the folder as
    the engine's replicas do (transformers' imports are over a second of CPU)."""
    import subprocess
    import sys

    code = ("import sys; from krasr_batch.engines import check_model; from krasr_batch.settings import DecodeOptions; "
            f"check_model(DecodeOptions(model={str(tiny_model)!r}, engine={engine!r})); "
            "print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr[-2000:]
