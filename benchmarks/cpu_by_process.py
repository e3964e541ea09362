"""CPU seconds of a command and every process it starts (Ray's services, workers and actors included).

    python -m benchmarks.cpu_by_process OUT.txt -- COMMAND [ARGS...]

Samples ``/proc/PID/stat`` of the command and its descendants every 0.1 s while it runs and writes, for each
process that used at least 0.05 s of CPU, when it was first and last seen (seconds from the start), its CPU
seconds (user + system) and its name (Ray names its workers ``ray::ClassName``). A process that lives less
than a sampling interval is missed, and one's last 0.1 s may be. This is how the demo job's fixed cost was
taken apart (BENCHMARKS.md, "The demo job and the terminal"): on a 2-core machine such a run is CPU-bound, so
CPU seconds saved anywhere are wall seconds saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _stat(pid: str) -> tuple[str, float] | None:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[1], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _name(pid: str) -> str:
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    return comm if comm.startswith("ray::") else (cmd or comm)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out, cmd = argv[0], argv[2:]
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    seen: dict[str, dict] = {}
    while True:
        done = proc.poll() is not None
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            st = _stat(pid)
            if st is None or (pid != str(proc.pid) and st[0] not in seen and st[0] != str(proc.pid)):
                continue
            now = time.time() - t0
            row = seen.setdefault(pid, {"first": now, "cpu": 0.0, "name": "?"})
            row["cpu"], row["last"] = max(row["cpu"], st[1]), now
            name = row["name"] if row["name"].startswith("ray::") else _name(pid)  # ray:: comes after start
            row["name"] = name if name != "?" else row["name"]
        if done:
            break
        time.sleep(0.1)
    wall = time.time() - t0
    rows = sorted(seen.values(), key=lambda r: r["first"])
    with open(out, "w") as f:
        f.write(f"wall {wall:.2f} s, CPU {sum(r['cpu'] for r in rows):.2f} s, exit status {proc.returncode}\n")
        for r in rows:
            if r["cpu"] >= 0.05:
                f.write(f"{r['first']:7.2f} {r['last']:7.2f}  cpu {r['cpu']:6.2f}  {r['name'][:110]}\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
