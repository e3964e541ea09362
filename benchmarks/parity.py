"""Parity of krasr-batch with the model card's pipeline call on the corpus clips.

    python -m benchmarks.parity --corpus DIR --model DIR [--out parity.json]

Runs `krasr-batch run` over the clips, then the card's pipeline call on each clip twice: on the file
(the pipeline decodes and resamples it with ffmpeg) and on the very samples krasr-batch decoded (soundfile
or PyAV, soxr resampling); prints equal-text fractions and WERs against the references. krasr-batch runs
with ``--engine transformers`` (the card's exact call; ``--engine`` here picks another), as
tests/test_parity.py does. A clip the card's limit cut short is decoded again at the "fit" budget by that
engine (README, Token limits): its text is compared with the card's call made with that budget too
(``equal_card_samples_at_its_limit``). The torch and CTranslate2 engines continue such a clip from the cut
text instead, so their text there is the card's call at its limit and what follows it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jiwer
import pyarrow.dataset as pads

from benchmarks.baselines import audio_duration_s, card_pipeline
from krasr_batch.audio import load_audio
from krasr_batch.engines import max_new_tokens_for
from krasr_batch.textnorm import normalize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--engine", default="transformers")
    a = ap.parse_args()
    corpus = Path(a.corpus)
    clips = [json.loads(x) for x in (corpus / "clips.jsonl").read_text().splitlines() if x.strip()]
    if a.limit:
        clips = clips[: a.limit]
    tmp = Path(tempfile.mkdtemp(prefix="parity-"))
    manifest = tmp / "clips.jsonl"
    manifest.write_text("".join(json.dumps({**c, "path": str(corpus / c["path"])}, ensure_ascii=False) + "\n" for c in clips))
    subprocess.run([sys.executable, "-m", "krasr_batch", "run", str(manifest), "--out", str(tmp / "out"),
                    "--model", a.model, "--no-progress", "--engine", a.engine], check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ours = {f["file_id"]: f["text"] for f in pads.dataset(tmp / "out" / "files").to_table().to_pylist()}
    # the limit each clip was decoded at: the card's, or the "fit" budget where the card's limit cut it short
    limits = {s["file_id"]: s["max_new_tokens"] for s in pads.dataset(tmp / "out" / "segments").to_table(
        columns=["file_id", "max_new_tokens"]).to_pylist()}
    asr = card_pipeline(a.model)
    rows = []
    for c in clips:
        path = str(corpus / c["path"])
        dur = audio_duration_s(path)
        gk = dict(task="transcribe", language=c["language"], num_beams=3, no_repeat_ngram_size=4,
                  repetition_penalty=1.12, max_new_tokens=max_new_tokens_for(dur))
        on_file = asr(path, generate_kwargs=gk)["text"].strip()
        samples = load_audio(path)
        card_limit = max_new_tokens_for(len(samples) / 16000)
        on_samples = asr({"raw": samples, "sampling_rate": 16000},
                         generate_kwargs=dict(gk, max_new_tokens=card_limit))["text"].strip()
        again = limits.get(c["id"], card_limit) != card_limit  # decoded again at the budget: the card's call with it
        at_limit = asr({"raw": samples, "sampling_rate": 16000},
                       generate_kwargs=dict(gk, max_new_tokens=limits[c["id"]]))["text"].strip() if again else on_samples
        rows.append({"id": c["id"], "path": c["path"], "ref": c["text"], "ours": ours[c["id"]], "card_file": on_file,
                     "card_samples": on_samples, "decoded_again": again, "card_samples_at_its_limit": at_limit})
    refs = [normalize(r["ref"]) for r in rows]
    report = {"clips": len(rows)}
    for k in ("ours", "card_file", "card_samples"):
        report[f"wer_{k}"] = jiwer.wer(refs, [normalize(r[k]) for r in rows])
    report["equal_card_file"] = sum(r["ours"] == r["card_file"] for r in rows) / len(rows)
    report["equal_card_samples"] = sum(r["ours"] == r["card_samples"] for r in rows) / len(rows)
    report["decoded_again"] = sum(r["decoded_again"] for r in rows)  # clips the card's limit cut short
    report["equal_card_samples_at_its_limit"] = sum(r["ours"] == r["card_samples_at_its_limit"] for r in rows) / len(rows)
    report["equal_card_file_16k_wav_only"] = (
        sum(r["ours"] == r["card_file"] for r in rows if r["path"].endswith(".wav")) /
        max(1, sum(1 for r in rows if r["path"].endswith(".wav"))))
    print(json.dumps(report, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps({"report": report, "rows": rows}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
