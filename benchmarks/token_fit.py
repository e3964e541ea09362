"""Does a correct transcript fit its token limit? Measured without a model (issue 17).

For each long recording of a corpus (``long.jsonl``, with sentence spans in ``spans.jsonl``), the windows
are planned exactly as a run plans them (Silero VAD, :func:`krasr_batch.segment.analyse`). Each window's
reference transcript is made of the sentences it overlaps, a sentence cut between two windows counting
in each by the share of its span that the window holds. Its length in the model's tokens, plus the
end-of-text token, is compared with the window's token limit under each policy. A perfect model would lose
the words of every window whose reference does not fit.

    python -m benchmarks.token_fit --corpus DIR --model MODEL_DIR [--max-segment-s 30 20 15 10]
    python -m benchmarks.token_fit --make-dense OUT_DIR --corpus DIR [--minutes 6]

``--make-dense`` writes a corpus of dense long recordings, one per kind of speech (kk, ru, mixed): the
corpus's clips of that kind, shuffled and repeated, with pauses of 0.15 to 0.6 s. The shared corpus's own
long recordings mix all kinds with pauses of up to 8 s, so their windows are sparser than talk is.

Prints one Markdown table per corpus: windows, windows holding only whole sentences, the share of windows
whose reference needs more tokens than the limit (card table and the default ``fit`` policy), and the
percentiles of reference tokens per window second.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from krasr_batch.engines import segment_token_limit
from krasr_batch.segment import analyse
from krasr_batch.settings import SegmentOptions

SAMPLE_RATE = 16000
WHOLE_SLACK_S = 0.05  # a sentence counts as whole in a window when it lies inside it with this slack


def load_spans(corpus: Path) -> dict[str, list[dict]]:
    spans: dict[str, list[dict]] = {}
    for line in (corpus / "spans.jsonl").read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        spans.setdefault(d["id"], []).append(d)
    return spans


def window_references(windows: list[tuple[float, float]], sentences: list[dict],
                      count_tokens) -> list[tuple[float, bool]]:
    """[(reference tokens incl. end-of-text, holds only whole sentences)] for each window."""
    out = []
    for ws, we in windows:
        tokens, whole = 1.0, True  # the end-of-text token
        for s in sentences:
            overlap = min(we, s["end_s"]) - max(ws, s["start_s"])
            if overlap <= 0:
                continue
            share = overlap / max(s["end_s"] - s["start_s"], 1e-6)
            tokens += share * count_tokens(s["text"])
            if s["start_s"] < ws - WHOLE_SLACK_S or s["end_s"] > we + WHOLE_SLACK_S:
                whole = False
        out.append((tokens, whole))
    return out


def measure(corpus: Path, tokenizer, max_segment_s: float) -> dict:
    spans = load_spans(corpus)
    count = lambda text: len(tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = []
    for line in (corpus / "long.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        plan = analyse(str(corpus / rec["path"]), SegmentOptions(max_segment_s=max_segment_s))
        windows = [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in plan.segments]
        whole_file = len(plan.segments) == 1 and plan.segments[0] == (0, round(plan.duration_s * SAMPLE_RATE))
        refs = window_references(windows, spans.get(rec["id"], []), count)
        for k, (tokens, whole) in enumerate(refs):
            d = plan.audio_samples(k) / SAMPLE_RATE  # the audio the model hears: the span less skipped pauses
            rows.append({"id": rec["id"], "duration_s": d, "tokens": tokens, "whole": whole,
                         "card": segment_token_limit(d, whole_file, "card"),
                         "fit": segment_token_limit(d, whole_file, "fit")})
    return {"max_segment_s": max_segment_s, "rows": rows}


def summarize(result: dict) -> dict:
    rows = result["rows"]
    n = len(rows)
    over = lambda key: sum(1 for r in rows if math.ceil(r["tokens"] - 1e-9) > r[key])  # noqa: E731
    rates = np.array([r["tokens"] / r["duration_s"] for r in rows if r["duration_s"] >= 5.0] or [0.0])
    return {"max_segment_s": result["max_segment_s"], "windows": n, "whole": sum(r["whole"] for r in rows),
            "over_card": over("card"), "over_fit": over("fit"),
            "rate_p50": float(np.percentile(rates, 50)), "rate_p90": float(np.percentile(rates, 90)),
            "rate_max": float(rates.max())}


def table(summaries: list[dict]) -> str:
    lines = ["| longest window | windows | windows of whole sentences | over the card's limit | over the `fit` limit "
             "| tokens/s p50 / p90 / max (windows >= 5 s) |", "|---|---|---|---|---|---|"]
    for s in summaries:
        pct = {k: f"{s[k]} ({100 * s[k] / max(s['windows'], 1):.0f} %)" for k in ("over_card", "over_fit")}
        lines.append(f"| {s['max_segment_s']:g} s | {s['windows']} | {s['whole']} | {pct['over_card']} | "
                     f"{pct['over_fit']} | {s['rate_p50']:.1f} / {s['rate_p90']:.1f} / {s['rate_max']:.1f} |")
    return "\n".join(lines)


def make_dense(corpus: Path, out: Path, minutes: float, seed: int = 0) -> None:
    """Dense long recordings (16 kHz WAV) with ``long.jsonl`` and ``spans.jsonl``, from ``corpus``'s clips."""
    import random

    from krasr_batch.audio import load_audio

    rng = random.Random(seed)
    clips = [json.loads(x) for x in (corpus / "clips.jsonl").read_text(encoding="utf-8").splitlines()]
    (out / "long").mkdir(parents=True, exist_ok=True)
    import soundfile as sf

    with open(out / "long.jsonl", "w", encoding="utf-8") as longf, open(out / "spans.jsonl", "w", encoding="utf-8") as spf:
        for kind in ("kk", "ru", "mixed"):
            pool = [c for c in clips if c["category"] == kind]
            rid, t, pieces, texts = f"dense_{kind}", 0.5, [np.zeros(SAMPLE_RATE // 2, np.float32)], []
            while t < minutes * 60:
                rng.shuffle(pool)
                for c in pool:
                    audio = load_audio(str(corpus / c["path"]))
                    spf.write(json.dumps({"id": rid, "start_s": round(t, 3), "end_s": round(t + len(audio) / SAMPLE_RATE, 3),
                                          "text": c["text"]}, ensure_ascii=False) + "\n")
                    gap = np.zeros(int(SAMPLE_RATE * rng.uniform(0.15, 0.6)), np.float32)
                    pieces += [audio, gap]
                    texts.append(c["text"])
                    t += (len(audio) + len(gap)) / SAMPLE_RATE
            audio = np.concatenate(pieces)
            sf.write(out / "long" / f"{rid}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
            longf.write(json.dumps({"id": rid, "path": f"long/{rid}.wav", "language": "russian" if kind == "ru" else "kazakh",
                                    "category": kind, "text": " ".join(texts),
                                    "duration_s": round(len(audio) / SAMPLE_RATE, 3)}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, type=Path)
    ap.add_argument("--model", help="a model folder (only its tokenizer is read)")
    ap.add_argument("--make-dense", type=Path, metavar="OUT_DIR", help="write a dense long-recording corpus and stop")
    ap.add_argument("--minutes", type=float, default=6.0, help="with --make-dense: minutes per recording")
    ap.add_argument("--max-segment-s", type=float, nargs="+", default=[30.0])
    ap.add_argument("--json", type=Path, help="also write every window's figures here")
    a = ap.parse_args(argv)
    if a.make_dense:
        make_dense(a.corpus, a.make_dense, a.minutes)
        return
    if not a.model:
        ap.error("--model is required")
    from transformers import WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast.from_pretrained(a.model)
    results = [measure(a.corpus, tokenizer, m) for m in a.max_segment_s]
    print(table([summarize(r) for r in results]))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
