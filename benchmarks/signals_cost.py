"""What the per-segment quality signals cost: the same decoding with and without the rescoring pass.

    python -m benchmarks.signals_cost --corpus DIR --model DIR [--clips 16] [--repeat 3] [--batch-size 1]

Decodes the first ``--clips`` corpus clips with one WhisperDecoder (one torch thread), alternating runs
with the signals on and off (off: ``WhisperDecoder._signals`` replaced by a no-op and the step recorder
emptied, for the run), and reports the median seconds of each and the overhead. Texts must be identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from krasr_batch.audio import load_audio
    from krasr_batch.engines import SegmentInput, max_new_tokens_for
    from krasr_batch.engines.transformers import WhisperDecoder
    from krasr_batch.settings import DecodeOptions

    corpus = Path(a.corpus)
    clips = [json.loads(x) for x in (corpus / "clips.jsonl").read_text().splitlines() if x.strip()][: a.clips]
    inputs = []
    for c in clips:
        audio = load_audio(str(corpus / c["path"]))
        inputs.append(SegmentInput(audio, c["language"], max_new_tokens_for(len(audio) / 16000)))
    dec = WhisperDecoder(DecodeOptions(model=a.model, batch_size=a.batch_size), device="cpu")
    import krasr_batch.engines.transformers as decode_module

    with_signals, recorder_call = dec._signals, decode_module._StepRecorder.__call__
    without = lambda out, encoded, seqs, spans, recorder: [(None, None)] * len(spans)  # noqa: E731
    dec.decode(inputs[:1])  # warm-up
    times: dict[str, list[float]] = {"with": [], "without": []}
    texts: dict[str, list[str]] = {}
    for _ in range(a.repeat):
        for mode in ("with", "without"):
            dec._signals = with_signals if mode == "with" else without
            decode_module._StepRecorder.__call__ = recorder_call if mode == "with" else (lambda self, i, s: s)
            t0 = time.perf_counter()
            out = dec.decode(inputs)
            times[mode].append(time.perf_counter() - t0)
            texts[mode] = [o.text for o in out]
    assert texts["with"] == texts["without"], "the rescoring pass changed a text"
    w, wo = statistics.median(times["with"]), statistics.median(times["without"])
    print(json.dumps({"clips": len(inputs), "repeat": a.repeat, "batch_size": a.batch_size, "threads": a.threads,
                      "with_signals_s": round(w, 2), "without_s": round(wo, 2),
                      "overhead_pct": round(100 * (w - wo) / wo, 2), "runs": times}, indent=1))


if __name__ == "__main__":
    main()
