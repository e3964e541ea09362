"""The token-limit policies side by side on long recordings, with a real model (issue 17).

Runs ``krasr-batch run`` over a corpus's ``long.jsonl`` once per policy, alternating, into fresh output
folders, and reports for each: windows, the share of segments that stopped at their limit (and why, as
``truncation`` says), wall seconds and RTFx of the whole command, and WER with its deletions
(:mod:`krasr_batch.evaluate`, the same scoring as ``krasr-batch eval``).

    python -m benchmarks.token_limit_runs --corpus DIR --model MODEL_DIR [--policies card fit]
        [--krasr-args '--engine ctranslate2'] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads

from krasr_batch.evaluate import evaluate
from krasr_batch.output import open_output


def run_policy(manifest: Path, model: str, policy: str, extra: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "krasr_batch", "run", str(manifest), "--out", str(out), "--model", model,
           "--token-limit", policy, "--overwrite", "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def figures(out: Path, wall_s: float) -> dict:
    seg = pads.dataset(str(out / "segments"), format="parquet").to_table(
        columns=["end_s", "start_s", "truncated", "truncation", "num_tokens", "max_new_tokens"]).to_pylist()
    files = pads.dataset(str(out / "files"), format="parquet").to_table(columns=["duration_s"]).to_pylist()
    audio_s = sum(f["duration_s"] or 0.0 for f in files)
    m = evaluate(open_output(str(out))).overall
    n = len(seg)
    return {"windows": n, "truncated": sum(1 for s in seg if s["truncated"]),
            "repetition": sum(1 for s in seg if s["truncation"] == "repetition"),
            "did_not_fit": sum(1 for s in seg if s["truncation"] == "did_not_fit"),
            "tokens": sum(s["num_tokens"] for s in seg), "wall_s": wall_s, "rtfx": audio_s / wall_s,
            "wer": m.wer, "cer": m.cer, "deletions": m.deletions, "insertions": m.insertions,
            "substitutions": m.substitutions}


def table(rows: dict[str, dict]) -> str:
    lines = ["| policy | windows | stopped at the limit | of which loops / did not fit | tokens decoded | wall s "
             "| RTFx | WER | CER | deletions | insertions |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for policy, r in rows.items():
        lines.append(f"| {policy} | {r['windows']} | {r['truncated']} ({100 * r['truncated'] / max(r['windows'], 1):.0f} %)"
                     f" | {r['repetition']} / {r['did_not_fit']} | {r['tokens']} | {r['wall_s']:.1f} | {r['rtfx']:.2f} "
                     f"| {100 * r['wer']:.1f} % | {100 * r['cer']:.1f} % | {r['deletions']} | {r['insertions']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--policies", nargs="+", default=["card", "fit"])
    ap.add_argument("--krasr-args", default="", help="extra arguments for krasr-batch run, one string")
    ap.add_argument("--repeat", type=int, default=1, help="runs per policy, alternating; the fastest wall counts")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    extra = shlex.split(a.krasr_args)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="krasr-limits-") as tmp:
        walls: dict[str, list[float]] = {p: [] for p in a.policies}
        for _ in range(a.repeat):
            for p in a.policies:
                walls[p].append(run_policy(a.corpus / "long.jsonl", a.model, p, extra, Path(tmp) / p))
        for p in a.policies:
            rows[p] = figures(Path(tmp) / p, min(walls[p]))
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
