"""Replicas x threads x batch for the CTranslate2 engine on a CPU, measured side by side (issue 12).

The same segments (the corpus's clips whole, and the windows of its long recordings as a run plans them,
each with its run's token limit) are decoded by ``R`` replica processes of ``T`` threads each, every replica
taking every R-th segment and decoding in batches of ``B`` segments of one token limit and one language
(:meth:`krasr_batch.engines.base.Decoder.decode`). Layouts run in turns, ``--repeat`` times; the median
wall of the decoding counts (model load excluded, as a long job amortises it).

    python -m benchmarks.ct2_layout --corpus DIR --model MODEL_DIR --layouts 2x1x1 2x1x4 1x2x8 [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


def load_segments(corpus: Path, limit_files: int = 0) -> list[tuple[np.ndarray, str, int, bool]]:
    """[(audio, language, max_new_tokens, whole file)] planned and limited exactly as a run does (``--token-limit fit``)."""
    from krasr_batch.engines import segment_token_limit
    from krasr_batch.segment import analyse, segment_audio
    from krasr_batch.settings import SegmentOptions

    rows = []
    for name in ("clips.jsonl", "long.jsonl"):
        items = [json.loads(x) for x in (corpus / name).read_text(encoding="utf-8").splitlines()]
        for it in items[:limit_files or None]:
            plan = analyse(str(corpus / it["path"]), SegmentOptions())
            for audio in segment_audio(plan):
                rows.append((audio, it.get("language") or "kazakh",
                             segment_token_limit(len(audio) / SAMPLE_RATE, plan.whole_file, "fit"), plan.whole_file))
    return rows


def _replica(model: str, threads: int, batch: int, segments, start, done, out, dtype: str = "auto") -> None:
    from krasr_batch.engines import SegmentInput, load_decoder
    from krasr_batch.settings import DecodeOptions

    dec = load_decoder(DecodeOptions(model=model, engine="ctranslate2", batch_size=batch, dtype=dtype), "cpu", threads)
    inputs = [SegmentInput(a, lang, limit, whole) for a, lang, limit, whole in segments]
    start.wait()
    t0 = time.perf_counter()
    results = dec.decode(inputs)
    out.put((time.perf_counter() - t0, sum(r.num_tokens for r in results)))
    done.wait()


def run_layout(model: str, replicas: int, threads: int, batch: int, segments, dtype: str = "auto") -> tuple[float, int]:
    """Wall seconds from the common start until the last replica finished; tokens decoded."""
    ctx = mp.get_context("spawn")
    start, done, out = ctx.Barrier(replicas + 1), ctx.Barrier(replicas + 1), ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(model, threads, batch, segments[i::replicas], start, done, out, dtype))
             for i in range(replicas)]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    results = [out.get() for _ in procs]
    wall = time.perf_counter() - t0
    done.wait()
    for p in procs:
        p.join()
    return wall, sum(n for _, n in results)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layouts", nargs="+", default=["2x1x1", "2x1x4", "1x2x1", "1x2x8"],
                    help="REPLICASxTHREADSxBATCH, optionally :DTYPE (e.g. 2x1x16:int8)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--limit-files", type=int, default=0, help="only the first N clips and N long recordings")
    a = ap.parse_args(argv)
    from krasr_batch.engines.ctranslate2 import converted_model

    converted_model(a.model)  # once, before replicas start
    segments = load_segments(a.corpus, a.limit_files)
    segments.sort(key=lambda s: (s[2], s[1]))  # as the pipeline's blocks would ideally arrive: by limit
    audio_s = sum(len(s[0]) for s in segments) / SAMPLE_RATE
    layouts = [(*(int(x) for x in lay.split(":")[0].split("x")), (lay.split(":") + ["auto"])[1]) for lay in a.layouts]
    walls: dict[tuple, list[float]] = {lay: [] for lay in layouts}
    tokens: dict[tuple, int] = {}
    for _ in range(a.repeat):
        for lay in layouts:
            wall, tokens[lay] = run_layout(a.model, *lay[:3], segments, lay[3])
            walls[lay].append(wall)
    base = statistics.median(walls[layouts[0]])
    print(f"{len(segments)} segments, {audio_s:.0f} s of audio; decoding wall, median of {a.repeat}")
    print("| replicas x threads x batch | dtype | wall s | RTFx (decoding) | vs first | tokens |")
    print("|---|---|---|---|---|---|")
    for lay in layouts:
        w = statistics.median(walls[lay])
        print(f"| {lay[0]} x {lay[1]} x {lay[2]} | {lay[3]} | {w:.1f} | {audio_s / w:.2f} | {base / w:.2f}x | {tokens[lay]} |")


if __name__ == "__main__":
    main()
