"""Beam search alone, CTranslate2 against the torch engine, on the same encoder output, in one process.

    python -m benchmarks.beam_cost MODEL_DIR AUDIO [--windows 16] [--repeat 2] [--threads 1]

Cuts ``--windows`` consecutive 30 s windows from AUDIO (from its 60th second on; a long recording), encodes
them once (torch bfloat16 where the CPU has bfloat16 units, else float32), and decodes them as one batch with
the card's settings (beam 3, no_repeat_ngram_size 4, repetition_penalty 1.12, language kk) and the ``fit``
budget of a 30 s window (360 tokens): CTranslate2 with float32 and int8 weights (``--engine ctranslate2``),
and the torch engine's search in bfloat16 and float32 (``--engine torch``). The systems take turns,
``--repeat`` times; the table gives the median seconds, tokens, milliseconds per decoded token (batch seconds
over the batch's tokens) and how many windows got CTranslate2 float32's tokens exactly.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.cost_windows import cost_parser, long_windows


def main(argv: list[str] | None = None) -> None:
    ap = cost_parser(__doc__)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    import ctranslate2
    import torch

    from krasr_batch.engines.ctranslate2 import converted_model, ct2_max_length
    from krasr_batch.engines.encoder import TorchEncoder, cpu_compute_type, cpu_has_bf16_matmul
    from krasr_batch.engines.torch_beam import WhisperDecoderStack, beam_search
    from krasr_batch.engines.vocab import generation_config

    torch.set_num_threads(a.threads)
    gc = generation_config(a.model)
    windows, feats = long_windows(a.model, a.audio, a.windows)
    enc_dtype = cpu_compute_type()
    encoded = TorchEncoder(a.model, enc_dtype, a.threads)(feats)
    prompt = [gc.decoder_start_token_id, gc.lang_to_id["<|kk|>"], gc.task_to_id["transcribe"], gc.no_timestamps_token_id]
    limit = 360
    path = str(converted_model(a.model))

    def ct2_system(ctype):
        model = ctranslate2.models.Whisper(path, device="cpu", compute_type=ctype, intra_threads=a.threads)

        def run():
            r = model.generate(ctranslate2.StorageView.from_array(encoded), [prompt] * len(windows), beam_size=3,
                               no_repeat_ngram_size=4, repetition_penalty=1.12, max_length=ct2_max_length(limit, 4))
            return [x.sequences_ids[0] for x in r]
        return run

    def torch_system(dtype):
        stack = WhisperDecoderStack(a.model, dtype)

        def run():
            with torch.inference_mode():
                cross = stack.cross(torch.from_numpy(encoded).to(stack.dtype))
                hyps = beam_search(stack, cross, [prompt] * len(windows), [limit] * len(windows), beams=3,
                                   eos=gc.eos_token_id, repetition_penalty=1.12, no_repeat_ngram_size=4,
                                   suppress=tuple(gc.suppress_tokens), begin_suppress=tuple(gc.begin_suppress_tokens))
            return [h[0] for h in hyps]
        return run

    systems = {"CTranslate2 float32": ct2_system("float32"), "CTranslate2 int8": ct2_system("int8"),
               "torch engine float32": torch_system("float32")}
    if cpu_has_bf16_matmul():
        systems["torch engine bfloat16"] = torch_system("bfloat16")
    times: dict[str, list[float]] = {k: [] for k in systems}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(a.repeat):
        for name, run in systems.items():
            t0 = time.perf_counter()
            tokens[name] = run()
            times[name].append(time.perf_counter() - t0)
    ref = tokens["CTranslate2 float32"]
    base = statistics.median(times["CTranslate2 float32"])
    print(f"{len(windows)} windows of 30 s from {a.audio}, encoder output in {enc_dtype}, {a.threads} thread(s), "
          f"median of {a.repeat}\n")
    print("| beam search | s | tokens | ms / token | vs CTranslate2 float32 | windows with its tokens |")
    print("|---|---|---|---|---|---|")
    for name in systems:
        s = statistics.median(times[name])
        n = sum(len(t) for t in tokens[name])
        same = sum(x == y for x, y in zip(tokens[name], ref))
        print(f"| {name} | {s:.2f} | {n} | {1000 * s / max(n, 1):.1f} | {base / s:.2f}x | {same} of {len(ref)} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
