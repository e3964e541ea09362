"""What a kill costs: SIGKILL a run part-way, rerun it, and count the work done twice.

    python -m benchmarks.resume_cost --corpus DIR --model DIR [--copies 4] [--kill-at 0.5]

The job is the corpus clips repeated ``--copies`` times. The run is killed (its whole process session,
Ray workers included) once ``--kill-at`` of the files are committed; the progress line printed just before
the kill says how many files were decoded by then. Work done twice = decoded but not yet committed at
the kill, as a fraction of the job. Also reports the rerun's wall time against an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

LINE = re.compile(r"files (\d+)/(\d+) \((\d+) failed, (\d+) committed\)")


def committed(out: Path) -> int:
    d = out / "files"
    return sum(pq.ParquetFile(f).metadata.num_rows for f in d.glob("*.parquet")) if d.exists() else 0


def run(args: list[str], kill_at: int | None = None) -> tuple[float, str, int | None]:
    p = subprocess.Popen([sys.executable, "-m", "krasr_batch", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: list[str] = []
    t = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    t.start()
    t0 = time.perf_counter()
    decoded_at_kill = None
    out = Path(args[args.index("--out") + 1])
    while p.poll() is None:
        if kill_at is not None and committed(out) >= kill_at:
            progress = [m for m in map(LINE.search, lines) if m]
            decoded_at_kill = int(progress[-1].group(1)) if progress else None
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            break
        time.sleep(0.05)
    t.join(timeout=5)
    return time.perf_counter() - t0, "".join(lines), decoded_at_kill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--kill-at", type=float, default=0.5)
    a = ap.parse_args()
    corpus = Path(a.corpus)
    clips = [json.loads(x) for x in (corpus / "clips.jsonl").read_text().splitlines() if x.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="resume-cost-"))
    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"{c['id']}#{k}", "path": str(corpus / c["path"]),
                                            "language": c["language"]}) + "\n"
                                for k in range(a.copies) for c in clips))
    n = len(clips) * a.copies
    common = ["--model", a.model]
    full_s, _, _ = run(["run", str(manifest), "--out", str(tmp / "full"), "--no-progress", *common])
    out = tmp / "killed"
    cmd = ["run", str(manifest), "--out", str(out), *common]
    killed_s, _, decoded = run(cmd, kill_at=int(a.kill_at * n))
    done = committed(out)
    rerun_s, log, _ = run(cmd)
    # the progress line is up to 2 s old at the kill, so it can trail the commits: clamp at zero
    redone = max(0, decoded - done) if decoded is not None else None
    m = re.search(r"(\d+) processed in this run", log)
    fig = {"files": n, "killed_after_s": round(killed_s, 1), "committed_at_kill": done, "decoded_at_kill": decoded,
           "redone_files": redone, "rerun_processed_files": int(m.group(1)) if m else None, "redone_fraction": None if redone is None else round(redone / n, 3),
           "uninterrupted_s": round(full_s, 1), "rerun_s": round(rerun_s, 1),
           "killed_plus_rerun_over_uninterrupted": round((killed_s + rerun_s) / full_s, 2)}
    print(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
