"""Decode-and-segment throughput of ``krasr-batch plan`` (no model): what the CPUs of a run can feed.

    python -m benchmarks.plan_throughput --corpus DIR [--repeats 3] [--num-cpus 2] [--write BENCHMARKS.md]

Runs ``krasr-batch plan CORPUS --out TMP`` (the corpus folder, every recording in it: clips, long recordings
and bad inputs) ``--repeats`` times into fresh folders, and reports the median of each figure from
``plan.json``: audio seconds per wall second of the whole command (Ray's start included), and audio seconds per
CPU-task second (the decode-and-segment tasks' own time, what one core does).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_measure import cpu_description
from benchmarks.bench_report import write_section

NAME = "plan-throughput"


def plan_once(corpus: str, num_cpus: int) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="krasr-plan-") as tmp:
        out = Path(tmp) / "plan"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "krasr_batch", "plan", corpus, "--out", str(out),
                            "--num-cpus", str(num_cpus), "--no-progress"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode not in (0, 3):
            raise SystemExit(f"plan failed ({r.returncode}): {r.stderr[-2000:]}")
        return json.loads((out / "plan.json").read_text()), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--write", metavar="BENCHMARKS.md")
    args = ap.parse_args()
    runs = [plan_once(args.corpus, args.num_cpus) for _ in range(args.repeats)]
    info = runs[0][0]
    med = lambda xs: statistics.median(xs)
    per_wall = med([i["run_audio_s"] / w for i, w in runs])
    per_task = med([i["audio_per_task_s"] for i, _ in runs])
    walls = [w for _, w in runs]
    limits = ", ".join(f"{k}: {v}" for k, v in info["segments_by_token_limit"].items())
    failures = ", ".join(f"{k} {v}" for k, v in info["failures_by_kind"].items()) or "none"
    argv = shlex.join(sys.argv[1:])
    body = f"""### {NAME}

{dt.date.today().isoformat()}, {cpu_description()}, `--num-cpus {args.num_cpus}`, {args.repeats} runs (median).
Input: the corpus folder `{args.corpus}` ({info['files']} files: {info['files_ok']} ok, {info['files_failed']} failed:
{failures}); {info['audio_s']:.0f} s of audio, {info['speech_s']:.0f} s of speech.

| figure | value |
|---|---|
| segments (windows of at most 30 s) | {info['segments']} (by token limit {limits}) |
| plain 30 s windows over the same audio | {info['fixed_windows_30s']} |
| wall s of the whole command (min / median / max) | {min(walls):.1f} / {med(walls):.1f} / {max(walls):.1f} |
| **audio s per wall s** (whole command, Ray's start included) | **{per_wall:.1f}** |
| audio s per CPU-task s (decode + VAD + plan, one core) | {per_task:.1f} |

Command: `python -m benchmarks.plan_throughput {argv}`
"""
    print(body)
    if args.write:
        write_section(Path(args.write), NAME, body)


if __name__ == "__main__":
    main()
