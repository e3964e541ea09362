"""Quiet recordings: what a file's level does to speech detection and to the model, as they are and raised.

    python -m benchmarks.quiet --corpus DIR --model DIR [--category ru] [--levels 0,-15,-25,-35,-50]
        [--engine torch] [--json out.json]

Each corpus clip of ``--category`` (``clips.jsonl``) is written lowered by each level (float WAV, no
quantisation), then planned by the pipeline's own ``segment.analyse`` twice: with ``max_gain_db=0`` (the
audio as it is, the card's input) and with the default (a quiet file raised: ``segment.quiet_gain_db``).
For each: the speech the VAD found (seconds, summed over the clips), and the model's error rates over the
windows ``segment.segment_audio`` gives (raised or not), decoded with ``--language`` forced and the card's
settings and limits, scored with jiwer after ``textnorm.normalize``. One engine replica serves every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="a corpus folder (clips.jsonl, clips/)")
    ap.add_argument("--model", required=True, help="a model folder (transformers format, safetensors)")
    ap.add_argument("--category", default="ru", help="the clips of this category (ru, kk, mixed)")
    ap.add_argument("--levels", default="0,-15,-25,-35,-50", help="dB below each clip's own level")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)

    import jiwer
    import soundfile as sf

    from krasr_batch.audio import SAMPLE_RATE, load_audio
    from krasr_batch.engines import SegmentInput, load_decoder, max_new_tokens_for
    from krasr_batch.segment import analyse, segment_audio
    from krasr_batch.settings import DecodeOptions, SegmentOptions
    from krasr_batch.textnorm import normalize

    corpus = Path(a.corpus).expanduser()
    rows = [json.loads(x) for x in (corpus / "clips.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [r for r in rows if r.get("category") == a.category]
    if not rows:
        sys.exit(f"no clips of category {a.category!r} in {corpus / 'clips.jsonl'}")
    language = {"ru": "russian"}.get(a.category, "kazakh")
    refs = [normalize(r["text"]) for r in rows]
    own = [load_audio(str(corpus / r["path"])) for r in rows]
    dec = load_decoder(DecodeOptions(model=str(Path(a.model).expanduser()), engine=a.engine, dtype=a.dtype,
                                     batch_size=16), "cpu", a.threads)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for db in (float(x) for x in a.levels.split(",")):
            paths = []
            for r, audio in zip(rows, own):
                p = Path(tmp) / f"{db:g}_{Path(r['path']).stem}.wav"
                sf.write(p, audio * 10 ** (db / 20), SAMPLE_RATE, subtype="FLOAT")
                paths.append(str(p))
            for gain_max, label in ((0.0, "as it is"), (SegmentOptions().max_gain_db, "raised")):
                plans = [analyse(p, SegmentOptions(max_gain_db=gain_max)) for p in paths]
                inputs, owner = [], []
                for i, plan in enumerate(plans):
                    for w in segment_audio(plan):
                        inputs.append(SegmentInput(w, language, max_new_tokens_for(len(w) / SAMPLE_RATE)))
                        owner.append(i)
                t0 = time.perf_counter()
                texts = [""] * len(rows)
                for i, o in zip(owner, dec.decode(inputs)):
                    texts[i] = (texts[i] + " " + o.text).strip()
                hyp = [normalize(t) for t in texts]
                row = dict(level_db=db, input=label, clips=len(rows),
                           gain_db=[round(20 * np.log10(p.gain), 1) for p in plans][0],
                           speech_s=round(sum(p.speech_s for p in plans), 1),
                           windows=len(inputs), wer=round(100 * jiwer.wer(refs, hyp), 1),
                           cer=round(100 * jiwer.cer(refs, hyp), 1), decode_s=round(time.perf_counter() - t0, 1))
                out.append(row)
                print(json.dumps(row, ensure_ascii=False), flush=True)
    print("\n| level | input | raised by (first clip) | speech found s | windows | WER % | CER % |")
    print("|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['level_db']:g} dB | {r['input']} | {r['gain_db']:g} dB | {r['speech_s']} | {r['windows']} | "
              f"{r['wer']} | {r['cer']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(argv=sys.argv, rows=out), indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
