"""The driver's memory over repeated Ray Data executions of the run's shape, without the model.

    python -m benchmarks.driver_memory [--rows 2000] [--executions 6] [--payload 200000] [--tasks]

Each execution: ``from_items(rows)`` -> ``repartition(4 rows a block)`` -> ``flat_map`` yielding a payload of
``--payload`` bytes a row (a window's audio is 64 KB a second) -> ``repartition(16)`` -> ``map_batches``
dropping it (an actor pool of one, or tasks with ``--tasks``) -> ``iter_batches`` on the driver, as a pass of
``krasr-batch run`` goes. After each execution (and ``gc.collect()``) it prints the driver's resident memory
split as Linux reports it: anonymous (the process's own) and shared (pages of Ray's object store it has
mapped). BENCHMARKS.md, "What the driver's growth is made of", has the figures.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np

from krasr_batch.pipeline.orchestrate import limit_malloc_arenas


def resident_mb() -> dict[str, int]:
    """VmRSS, RssAnon and RssShmem of this process, in MB (Linux)."""
    keys = ("VmRSS", "RssAnon", "RssShmem")
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in f) if k in keys}


class _Drop:
    def __call__(self, batch):
        return {"i": batch["i"], "text": np.array(["x" * 300] * len(batch["i"]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--executions", type=int, default=6)
    ap.add_argument("--payload", type=int, default=200_000, help="bytes a row carries to the model stage")
    ap.add_argument("--tasks", action="store_true", help="the last stage as tasks, not an actor pool")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args(argv)
    limit_malloc_arenas()  # two malloc arenas, as krasr-batch's driver keeps
    import ray
    import ray.data

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    payload = args.payload

    def segment(row):
        yield {"i": row["i"], "audio": np.random.bytes(payload)}

    print(f"rows {args.rows}, payload {payload} B, model stage {'tasks' if args.tasks else 'an actor pool of 1'}")
    for k in range(args.executions):
        t0 = time.perf_counter()
        ds = ray.data.from_items([{"i": i} for i in range(args.rows)]).repartition(target_num_rows_per_block=4)
        ds = ds.flat_map(segment, num_cpus=0.5).repartition(target_num_rows_per_block=16)
        if args.tasks:
            ds = ds.map_batches(_Drop(), batch_size=16, num_cpus=0.5)
        else:
            ds = ds.map_batches(_Drop, batch_size=16, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
        n = sum(len(b["i"]) for b in ds.iter_batches(batch_size=None, prefetch_batches=0))
        del ds
        gc.collect()
        m = resident_mb()
        print(f"execution {k + 1}: {n} rows, {time.perf_counter() - t0:.1f} s; driver MB: RSS {m['VmRSS']}, "
              f"anonymous {m['RssAnon']}, shared {m['RssShmem']}", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
