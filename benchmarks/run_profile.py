"""Where a run's wall time went, from what the run wrote (``run.json``'s ``profile`` and ``segments/``).

    python -m benchmarks.run_profile OUT [--write BENCHMARKS.md --section NAME]

Phases of the wall time: start-up (interpreter, imports, the model check running while the embedded Ray starts,
the manifest), waiting for the first result (replicas loading, the first files decoded and cut), the steady
part (first to last result), and the end (the last commit and ``run.json``; Ray's shutdown comes after the
run's own clock stops). Then how busy the model replicas were in the steady part (seconds in model calls over
replicas x seconds), the decode-and-segment tasks' seconds, and per replica its segments, model seconds and
tokens. On a CPU every replica and task shares the same cores, so the shares say what the cores did.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def profile(out: Path) -> str:
    import duckdb

    info = json.loads((out / "run.json").read_text())
    prof = info.get("profile") or {}
    tl = prof.get("timeline_s") or {}
    wall = info["wall_s"]
    con = duckdb.connect()
    seg = f"'{out}/segments/*.parquet'"
    workers = con.execute(
        f"select worker, count(*), sum(decode_s / greatest(batch_size, 1)), sum(num_tokens), sum(audio_s), "
        f"avg(batch_size) from {seg} group by worker order by worker").fetchall()
    tokens, segments = con.execute(f"select sum(num_tokens), count(*) from {seg}").fetchone()
    first, last = tl.get("first_result"), tl.get("last_result")
    lines = [f"- run: {info['counts']['files']} files, {info['audio_s']:.0f} s of audio, "
             f"{segments} segments (one encoder pass each), {tokens} tokens decoded; wall {wall:.1f} s, "
             f"RTFx {info['rtfx']:.1f}; engine {info.get('engine', {}).get('chosen', info['settings']['decode']['engine'])}",
             "", "| phase | from s | to s | seconds | share |", "|---|---|---|---|---|"]
    marks = [("start-up: imports, model check while Ray starts, manifest", 0.0, tl.get("ray_ready")),
             ("until the first result: replicas load, the first block (one model call of up to 16 segments) decoded", tl.get("ray_ready"), first),
             ("steady: first to last result", first, last),
             ("end: last commit, run.json", last, wall)]
    for name, a, b in marks:
        if a is not None and b is not None:
            lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b - a:.1f} | {100 * (b - a) / wall:.0f} % |")
    model_s, segment_s = prof.get("model_s", 0.0), prof.get("segment_s", 0.0)
    lines += ["", f"- model calls: {model_s:.1f} s over {len(workers)} replica(s)"]
    if first is not None and last is not None and workers:
        busy_window = len(workers) * (last - (tl.get("ray_ready") or 0.0))
        lines[-1] += (f"; busy {100 * model_s / busy_window:.0f} % of replicas x (Ray ready to last result)")
    lines += [f"- decode-and-segment tasks (audio decoding, resampling, VAD, cutting): {segment_s:.1f} s",
              f"- model seconds per segment {model_s / max(segments, 1):.2f}, per 1000 tokens "
              f"{1000 * model_s / max(tokens or 1, 1):.1f}", "",
              "| replica | segments | model s | tokens | audio s | mean batch |", "|---|---|---|---|---|---|"]
    for w, n, m, t, a, b in workers:
        lines.append(f"| {w} | {n} | {m:.1f} | {t} | {a:.0f} | {b:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--write")
    ap.add_argument("--section")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    text = profile(a.out)
    print(text)
    if a.write:
        from benchmarks.bench_report import write_section

        write_section(Path(a.write), a.section, f"### {a.section}\n\n{a.title}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
