"""Where a segment's decoding time goes, in each engine: the profile behind the CPU throughput figures.

    python -m benchmarks.profile_decode --corpus DIR --model DIR [--clips 12] [--threads 1]
        [--write BENCHMARKS.md --section NAME]

Decodes the first ``--clips`` corpus clips one at a time (as a CPU replica does) with each engine and
the card's settings, and splits the wall time with timers placed on the model's own modules:

- transformers: log-mel features, the encoder, the first decoder pass over the prompt (prefill: it also
  projects the encoder output to cross-attention keys and values for every beam), the decoder steps
  (their forward passes), beam search's cache reordering (``EncoderDecoderCache.reorder_cache``), and the
  rest of ``generate()`` (logits processors, beam bookkeeping, the quality signals);
- ctranslate2: the encoder (``Whisper.encode`` on the same features, timed apart) and the rest (prompt,
  decoder steps and beam search, all in C++).

Both engines run in this one process, one after the other, so the figures are side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.compare import cpu_description, versions, write_section

CT2_REST = "prompt, decoder steps and beam search (C++)"


class Timers:
    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        self.total[name] = self.total.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1


def _hook_module(module, name_of, timers: Timers) -> None:
    """Time every forward of ``module``; ``name_of(args, kwargs)`` names the bucket."""
    starts: list[tuple[str, float]] = []

    def pre(mod, args, kwargs):
        starts.append((name_of(args, kwargs), time.perf_counter()))

    def post(mod, args, kwargs, output):
        name, t0 = starts.pop()
        timers.add(name, time.perf_counter() - t0)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)


@contextmanager
def _timed_reorder(timers: Timers):
    from transformers import cache_utils

    cls = cache_utils.EncoderDecoderCache
    original = cls.reorder_cache

    def reorder(self, beam_idx):
        t0 = time.perf_counter()
        try:
            return original(self, beam_idx)
        finally:
            timers.add("cache reorder", time.perf_counter() - t0)

    cls.reorder_cache = reorder
    try:
        yield
    finally:
        cls.reorder_cache = original


def profile_transformers(model: str, inputs, threads: int) -> dict:
    import torch

    from krasr_batch.engines import load_decoder
    from krasr_batch.settings import DecodeOptions

    dec = load_decoder(DecodeOptions(model=model), "cpu", threads)
    dec.decode(inputs[:1])  # warm-up
    timers = Timers()
    _hook_module(dec.model.model.encoder, lambda a, k: "encoder", timers)

    def decoder_bucket(args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        return "decoder steps" if ids is not None and ids.shape[-1] == 1 else "prefill"

    _hook_module(dec.model.model.decoder, decoder_bucket, timers)
    feats_s = 0.0
    for x in inputs:
        t0 = time.perf_counter()
        dec.feature_extractor(x.audio, sampling_rate=16000, return_tensors="pt")
        feats_s += time.perf_counter() - t0
    tokens = 0
    with _timed_reorder(timers), torch.inference_mode():
        t0 = time.perf_counter()
        for x in inputs:
            tokens += dec.decode([x])[0].num_tokens
        wall = time.perf_counter() - t0
    steps = timers.calls.get("decoder steps", 0)
    # the no-speech signal runs the decoder once more per segment (one token): counted among the decoder steps
    parts = {"features": feats_s, **timers.total}
    parts["rest of generate() (processors, beam bookkeeping, signals)"] = wall - sum(parts.values())
    return {"wall_s": wall, "tokens": tokens, "steps": steps, "parts": parts}


def profile_ctranslate2(model: str, inputs, threads: int) -> dict:
    import ctranslate2
    import numpy as np

    from krasr_batch.engines import load_decoder
    from krasr_batch.settings import DecodeOptions

    dec = load_decoder(DecodeOptions(model=model, engine="ctranslate2"), "cpu", threads)
    dec.decode(inputs[:1])
    feats_s = enc_s = 0.0
    for x in inputs:
        t0 = time.perf_counter()
        f = dec.feature_extractor(x.audio, sampling_rate=16000, return_tensors="np")["input_features"]
        t1 = time.perf_counter()
        dec.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(f)))
        feats_s += t1 - t0
        enc_s += time.perf_counter() - t1
    t0 = time.perf_counter()
    outs = [dec.decode([x])[0] for x in inputs]
    wall = time.perf_counter() - t0
    tokens = sum(o.num_tokens for o in outs)
    steps = sum(min(o.num_tokens + 1, x.max_new_tokens) for o, x in zip(outs, inputs))
    parts = {"features": feats_s, "encoder": enc_s,
             CT2_REST: wall - feats_s - enc_s}
    return {"wall_s": wall, "tokens": tokens, "steps": steps, "parts": parts}


def render(results: dict[str, dict], n: int) -> str:
    lines = ["| engine | part | ms a segment | share |", "|---|---|---|---|"]
    for engine, r in results.items():
        for part, s in r["parts"].items():
            lines.append(f"| {engine} | {part} | {1000 * s / n:.0f} | {100 * s / r['wall_s']:.0f} % |")
        per_step = ""
        if r["steps"]:
            step_s = r["parts"].get("decoder steps")
            if step_s is None:
                step_s = r["parts"][CT2_REST]
            per_step = f"; {1000 * step_s / r['steps']:.1f} ms a decoder step ({r['steps']} steps)"
        lines.append(f"| {engine} | **total** | **{1000 * r['wall_s'] / n:.0f}** | {r['tokens']} tokens{per_step} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write")
    ap.add_argument("--section")
    a = ap.parse_args(argv)
    from krasr_batch.audio import load_audio
    from krasr_batch.engines import SegmentInput, max_new_tokens_for

    corpus = Path(a.corpus)
    clips = [json.loads(x) for x in (corpus / "clips.jsonl").read_text().splitlines() if x.strip()]
    clips = clips[:: max(1, len(clips) // a.clips)][: a.clips]  # spread over the languages
    inputs = []
    for c in clips:
        audio = load_audio(str(corpus / c["path"]))
        inputs.append(SegmentInput(audio, c.get("language"), max_new_tokens_for(len(audio) / 16000)))
    results = {"transformers": profile_transformers(a.model, inputs, a.threads),
               "ctranslate2": profile_ctranslate2(a.model, inputs, a.threads)}
    ratio = results["transformers"]["wall_s"] / results["ctranslate2"]["wall_s"]
    audio_s = sum(len(x.audio) for x in inputs) / 16000
    report = render(results, len(inputs)) + "\n\n" + "\n".join([
        f"- ctranslate2 over transformers: {ratio:.2f}x on the same {len(inputs)} segments "
        f"({audio_s:.0f} s of audio), one segment at a time, {a.threads} thread(s)",
        f"- device: {cpu_description()}; load average before: {os.getloadavg()[0]:.2f}",
        f"- model: {a.model}",
        f"- versions: {versions()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} python -m benchmarks.profile_decode "
        f"--corpus {a.corpus} --model {a.model} --clips {a.clips} --threads {a.threads}`",
    ])
    print(report)
    if a.write:
        write_section(Path(a.write), a.section, f"### {a.section}\n\n{report}")


if __name__ == "__main__":
    main()
