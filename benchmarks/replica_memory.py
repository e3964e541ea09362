"""One model replica's memory, as the pipeline's model stage builds it, over a batch of long windows.

    python -m benchmarks.replica_memory MODEL_DIR AUDIO [--engine torch] [--windows 16] [--limit 360]
        [--threads 1] [--dtype auto]

Loads one replica with ``load_decoder`` (what ``ModelStage`` does on a CPU), then decodes ``--windows``
consecutive 30 s windows of AUDIO (from its 60th second) as one call with the card's settings and a limit of
``--limit`` tokens (360: the ``fit`` budget of a 30 s window). Prints the process's resident memory after
the load and its peak during the load (weights converted and packed), its peak during the decode (``VmHWM``,
reset after the load) and what it keeps afterwards, with the
decode's seconds and tokens. With ``small-random`` (the KRASR model's shape, whose random weights decode to
the limit) this is the worst case of a replica's memory; multiply by the replicas a node runs (one per core
by default on a CPU).
"""

from __future__ import annotations

import time

from benchmarks.cost_windows import cost_parser, long_windows


def _status_mb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak resident size (Linux)
        f.write("5")


def main(argv: list[str] | None = None) -> None:
    ap = cost_parser(__doc__)
    ap.add_argument("--engine", default="torch", choices=["torch", "ctranslate2", "transformers"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--limit", type=int, default=360)
    a = ap.parse_args(argv)
    from krasr_batch.engines import SegmentInput, load_decoder
    from krasr_batch.settings import DecodeOptions

    windows, _ = long_windows(a.model, a.audio, a.windows)
    t0 = time.perf_counter()
    dec = load_decoder(DecodeOptions(model=a.model, engine=a.engine, dtype=a.dtype, batch_size=a.windows), "cpu",
                       a.threads)
    load = _status_mb()
    loaded, load_peak = load["VmRSS"], load["VmHWM"]  # the load's own peak: weights converted, packed
    load_s = time.perf_counter() - t0
    _reset_peak()
    t0 = time.perf_counter()
    out = dec.decode([SegmentInput(w, "kazakh", a.limit, False) for w in windows])
    decode_s = time.perf_counter() - t0
    after = _status_mb()
    print(f"{a.engine} ({dec.label}), {a.windows} windows of 30 s, limit {a.limit}, {a.threads} thread(s)")
    print("| loaded (MB) | peak while loading (MB) | peak while decoding (MB) | kept after (MB) | load s | decode s "
          "| tokens |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {loaded} | {load_peak} | {after['VmHWM']} | {after['VmRSS']} | {load_s:.1f} | {decode_s:.1f} | "
          f"{sum(r.num_tokens for r in out)} |")


if __name__ == "__main__":
    main()
