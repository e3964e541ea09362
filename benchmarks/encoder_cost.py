"""What Whisper's encoder pass over a 30 s window costs on this CPU, by backend and precision.

    python -m benchmarks.encoder_cost MODEL_DIR AUDIO [--windows 4] [--repeat 5] [--threads 1]

Cuts ``--windows`` consecutive 30 s windows from AUDIO (from its 60th second on; a long recording), computes
their log-mel features once, and times, interleaved ``--repeat`` times, the encoder of:

- CTranslate2 with int8 weights (the CTranslate2 engine's own encoder on CPUs before engines/encoder.py);
- CTranslate2 with float32 weights;
- krasr-batch's torch encoder (engines/encoder.py) in float32 and in bfloat16, and in bfloat16 with PyTorch's
  flash-attention kernel in place of ``engines.encoder.attention``'s two products (what it ran until stop 44).

It reports the median seconds per window and how far each output is from CTranslate2's float32 encoder (mean
absolute difference over the output's mean absolute value). This is the measurement behind running the encoder
in torch bfloat16 on CPUs with bfloat16 matrix units (AMX, AVX512-BF16): ``--dtype auto`` does so where
``/proc/cpuinfo`` lists ``amx_bf16`` or ``avx512_bf16``.
"""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np

from benchmarks.cost_windows import cost_parser, flash_kernel_in_encoder, long_windows


def main(argv: list[str] | None = None) -> None:
    ap = cost_parser(__doc__)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    import ctranslate2
    import torch

    from krasr_batch.engines.ctranslate2 import converted_model
    from krasr_batch.engines.encoder import TorchEncoder, cpu_has_bf16_matmul

    torch.set_num_threads(a.threads)
    path = converted_model(a.model)
    _, feats = long_windows(a.model, a.audio, a.windows)

    def ct2_encoder(ctype: str):
        model = ctranslate2.models.Whisper(str(path), device="cpu", compute_type=ctype, intra_threads=a.threads)
        x = ctranslate2.StorageView.from_array(feats)
        return lambda: np.array(model.encode(x))

    def torch_encoder(dtype: str, flash: bool = False):
        encoder = TorchEncoder(a.model, dtype, a.threads)
        if not flash:
            return lambda: encoder(feats)

        def run():
            with flash_kernel_in_encoder():
                return encoder(feats)
        return run

    systems = {
        "CTranslate2 int8": ct2_encoder("int8"),
        "CTranslate2 float32": ct2_encoder("float32"),
        "torch float32": torch_encoder("float32"),
        "torch bfloat16": torch_encoder("bfloat16"),
        "torch bfloat16, flash-attention kernel": torch_encoder("bfloat16", flash=True),
    }
    outputs = {name: fn() for name, fn in systems.items()}  # also warms each up
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(a.repeat):
        for name, fn in systems.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ref = outputs["CTranslate2 float32"]
    scale = float(np.abs(ref).mean())
    base = statistics.median(times["CTranslate2 int8"])
    print(f"{a.windows} windows of 30 s, {a.threads} thread(s), median of {a.repeat} interleaved runs; "
          f"{platform.processor() or platform.machine()}, bfloat16 matrix units: {cpu_has_bf16_matmul()}\n")
    print("| encoder | s / window | vs CTranslate2 int8 | difference from CTranslate2 float32 |")
    print("|---|---|---|---|")
    for name in systems:
        med = statistics.median(times[name])
        diff = float(np.abs(outputs[name] - ref).mean()) / scale
        print(f"| {name} | {med / a.windows:.3f} | {base / med:.2f}x | {100 * diff:.2f} % |")


if __name__ == "__main__":
    main()
