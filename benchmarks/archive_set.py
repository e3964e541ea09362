"""The archive-scale benchmark set (issue 12): at least an hour of audio, at least 200 short clips and at
least 6 long recordings, so that a run's fixed cost (start-up, model load, shutdown) no longer decides the
figure.

    python -m benchmarks.archive_set OUT [--clip-copies 5] [--long 6] [--long-minutes 8] [--seed 1]

Builds the synthetic corpus (``krasr_batch.testing.corpus.build_corpus``: 50 clips in five formats and rates,
``--long`` recordings of ``--long-minutes`` each, drawn from the clips with pauses of 0.15 to 8 s), then
rewrites ``clips.jsonl`` with each clip listed ``--clip-copies`` times under fresh ids (``ru_000``,
``ru_000~1``, ...): an archive of short clips, for what a run does per file. The set is then used as
``benchmarks.compare --corpus OUT --set clips|long|all``. Defaults: 250 clips (about 15 min) and 6 recordings
of 8 min (48 min), 63 minutes in all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build(out: Path, clip_copies: int = 5, long: int = 6, long_minutes: float = 8.0, seed: int = 1) -> Path:
    from krasr_batch.testing.corpus import build_corpus

    if not (out / "BUILT").exists():
        build_corpus(out, long=long, long_minutes=long_minutes, seed=seed, bad=False)
    src = out / "clips.unique.jsonl"
    if not src.exists():
        (out / "clips.jsonl").rename(src)
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    with open(out / "clips.jsonl", "w", encoding="utf-8") as f:
        for k in range(clip_copies):
            for r in rows:
                f.write(json.dumps({**r, "id": r["id"] if k == 0 else f"{r['id']}~{k}"}, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.archive_set", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--clip-copies", type=int, default=5)
    ap.add_argument("--long", type=int, default=6)
    ap.add_argument("--long-minutes", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    out = build(a.out, a.clip_copies, a.long, a.long_minutes, a.seed)
    import soundfile as sf

    for name in ("clips", "long"):
        rows = [json.loads(x) for x in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        secs = sum(sf.info(str(out / r["path"])).duration for r in rows)
        print(f"{name}: {len(rows)} files, {secs / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
