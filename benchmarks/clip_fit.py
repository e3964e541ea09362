"""Clips as archives of short files hold them, and whether the card's token limit cuts them (no model needed).

The shared corpus's clips are single short sentences; archives hold clips of 2 to 30 s. ``make`` cuts such
clips from a corpus's long recordings at sentence ends (``spans.jsonl``): consecutive sentences up to a
length drawn between 2 and 30 s, each clip from the middle of the pause before its first sentence to the
middle of the pause after its last (at most 0.3 s from the speech), its reference the sentences' text.
``fit`` compares each clip's reference, in the model's tokens plus end-of-text, with the card's limit for
its length (what a clip decoded whole gets) and with the "fit" budget (what a clip that limit cuts short
goes on to). ``score`` reads a run's output against the manifest: error rates with deletions, and
segments by how they ended.

    python -m benchmarks.clip_fit make CORPUS [CORPUS ...] --out OUT_DIR [--seed 1]   # OUT_DIR/clips.jsonl, WAVs
    python -m benchmarks.clip_fit fit OUT_DIR/clips.jsonl --model MODEL_DIR
    python -m benchmarks.clip_fit score OUT_DIR/clips.jsonl RUN_OUT [RUN_OUT ...]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

KAZAKH_LETTERS = set("әғқңөұүһіӘҒҚҢӨҰҮҺІ")


def make(corpora: list[Path], out: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, corpus in enumerate(corpora):
        rows += _cut(corpus, out, f"c{k}_", rng)
    with open(out / "clips.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return rows


def _cut(corpus: Path, out: Path, prefix: str, rng: random.Random) -> list[dict]:
    import soundfile as sf

    from krasr_batch.audio import SAMPLE_RATE as SR
    from krasr_batch.audio import load_audio

    spans = [json.loads(line) for line in open(corpus / "spans.jsonl", encoding="utf-8")]
    rows = []
    for rec in (json.loads(line) for line in open(corpus / "long.jsonl", encoding="utf-8")):
        audio = load_audio(str(corpus / rec["path"]))
        ss = [s for s in spans if s["id"] == rec["id"]]
        i = 0
        while i < len(ss):
            target, j = rng.uniform(2.0, 30.0), i
            while j + 1 < len(ss) and ss[j + 1]["end_s"] - ss[i]["start_s"] <= target:
                j += 1
            before = ss[i - 1]["end_s"] if i else 0.0
            after = ss[j + 1]["start_s"] if j + 1 < len(ss) else len(audio) / SR
            a0 = max(before + (ss[i]["start_s"] - before) / 2, ss[i]["start_s"] - 0.3, 0.0)
            a1 = min(ss[j]["end_s"] + (after - ss[j]["end_s"]) / 2, ss[j]["end_s"] + 0.3)
            if a1 - a0 <= 30.0:
                text = " ".join(s["text"] for s in ss[i:j + 1])
                name = f"{prefix}{rec['id']}_{i:03d}.wav"
                sf.write(out / name, audio[int(a0 * SR):int(a1 * SR)], SR, subtype="PCM_16")
                rows.append({"id": name, "path": name, "language": "kazakh", "text": text, "sentences": j - i + 1,
                             "category": "kk" if KAZAKH_LETTERS & set(text) else "ru"})
            i = j + 1
    return rows


def fit(manifest: Path, model: str) -> dict:
    import soundfile as sf
    from transformers import WhisperTokenizer

    from krasr_batch.engines import max_new_tokens_for, segment_token_limit

    tok = WhisperTokenizer.from_pretrained(model)
    n, over, over_budget = Counter(), Counter(), 0
    for line in open(manifest, encoding="utf-8"):
        r = json.loads(line)
        d = sf.info(manifest.parent / r["path"]).duration
        need = len(tok(" " + r["text"], add_special_tokens=False).input_ids) + 1
        bucket = next(f"<= {e} s" for e in (5, 10, 20, 30, 1e9) if d <= e)
        n[bucket] += 1
        over[bucket] += need > max_new_tokens_for(d)
        over_budget += need > segment_token_limit(d, False, "fit")
    total = sum(n.values())
    return {"clips": total, "over_card": sum(over.values()), "over_card_pct": round(100 * sum(over.values()) / total, 1),
            "by_length": {k: f"{over[k]}/{n[k]}" for k in sorted(n, key=lambda k: float(k.split()[1]))},
            "over_fit_budget": over_budget}


def score(manifest: Path, out: Path) -> dict:
    import jiwer
    import pyarrow.dataset as ds

    from krasr_batch.engines import max_new_tokens_for
    from krasr_batch.textnorm import normalize

    refs = {r["id"]: r["text"] for r in (json.loads(line) for line in open(manifest, encoding="utf-8"))}
    files = {f["file_id"]: f for f in ds.dataset(out / "files").to_table(columns=["file_id", "text"]).to_pylist()}
    segs = ds.dataset(out / "segments").to_table(
        columns=["audio_s", "max_new_tokens", "num_tokens", "truncation"]).to_pylist()
    ids = sorted(refs)
    ref = [normalize(refs[i]) for i in ids]
    hyp = [normalize(files.get(i, {}).get("text") or "") for i in ids]
    w, c = jiwer.process_words(ref, hyp), jiwer.process_characters(ref, hyp)
    return {"out": str(out), "wer_pct": round(100 * w.wer, 2), "cer_pct": round(100 * c.cer, 2),
            "deletions": w.deletions, "insertions": w.insertions, "substitutions": w.substitutions,
            "segments": len(segs), "tokens": sum(s["num_tokens"] for s in segs),
            "did_not_fit": sum(s["truncation"] == "did_not_fit" for s in segs),
            "repetition": sum(s["truncation"] == "repetition" for s in segs),
            "above_card_limit": sum(s["max_new_tokens"] > max_new_tokens_for(s["audio_s"]) for s in segs)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("corpora", type=Path, nargs="+")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--seed", type=int, default=1)
    f = sub.add_parser("fit")
    f.add_argument("manifest", type=Path)
    f.add_argument("--model", required=True)
    s = sub.add_parser("score")
    s.add_argument("manifest", type=Path)
    s.add_argument("outs", type=Path, nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "make":
        rows = make(a.corpora, a.out, a.seed)
        import soundfile as sf

        seconds = sum(sf.info(a.out / r["path"]).duration for r in rows)
        print(json.dumps({"clips": len(rows), "minutes": round(seconds / 60, 1)}))
    elif a.cmd == "fit":
        print(json.dumps(fit(a.manifest, a.model), ensure_ascii=False))
    else:
        for out in a.outs:
            print(json.dumps(score(a.manifest, out)))


if __name__ == "__main__":
    main()
