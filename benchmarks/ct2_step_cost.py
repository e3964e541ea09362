"""What one CTranslate2 model call costs on a CPU, per window and per decoded token, by batch and weight type.

    python -m benchmarks.ct2_step_cost MODEL_DIR AUDIO [--types float32,int8] [--batches 1,8,16] [--threads 1]

Cuts 16 consecutive 30 s windows from AUDIO (from its 60th second on; a long recording), computes their
log-mel features, and for each weight type and batch size times the encoder pass and the beam search (the
card's settings: beam 3, no_repeat_ngram_size 4, repetition_penalty 1.12, language kk) in one process.
Reports encoder seconds per window, decoding seconds per window, tokens per window and milliseconds per decoded
token (batch seconds over the batch's tokens). This is the measurement behind the CPU defaults (int8 weights,
batches of 16): a CPU decoder step is bound by reading the weights and each row's cross-attention cache.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.cost_windows import cost_parser, long_windows


def main(argv: list[str] | None = None) -> None:
    ap = cost_parser(__doc__)
    ap.add_argument("--types", default="float32,int8")
    ap.add_argument("--batches", default="1,8,16")
    a = ap.parse_args(argv)
    import ctranslate2
    from transformers.models.whisper.tokenization_whisper import WhisperTokenizer

    from krasr_batch.engines.ctranslate2 import converted_model

    path = converted_model(a.model)
    tok = WhisperTokenizer.from_pretrained(a.model)
    windows, feats = long_windows(a.model, a.audio, 16)
    prompt = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|kk|>", "<|transcribe|>", "<|notimestamps|>"])
    print("| weights | batch | encoder s / window | decoding s / window | tokens / window | ms / token |")
    print("|---|---|---|---|---|---|")
    for ctype in a.types.split(","):
        model = ctranslate2.models.Whisper(str(path), device="cpu", compute_type=ctype, intra_threads=a.threads)
        for b in (int(x) for x in a.batches.split(",")):
            x = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats[:b]))
            t0 = time.perf_counter()
            enc = model.encode(x, to_cpu=False)
            te = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = model.generate(enc, [prompt] * b, beam_size=3, no_repeat_ngram_size=4, repetition_penalty=1.12,
                               max_length=720)
            tg = time.perf_counter() - t0
            n = sum(len(y.sequences_ids[0]) for y in r)
            print(f"| {ctype} | {b} | {te / b:.2f} | {tg / b:.2f} | {n / b:.0f} | {1000 * tg / max(n, 1):.1f} |")


if __name__ == "__main__":
    main()
