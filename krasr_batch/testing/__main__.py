"""``python -m krasr_batch.testing``: build test models and corpora from the command line.

    python -m krasr_batch.testing models VARIANT DIR      # tiny-random, small-random or base
    python -m krasr_batch.testing corpus DIR [--long N] [--long-minutes M] [--seed S] [--no-bad]
    python -m krasr_batch.testing cache [DIR]             # what the tests use, into $KRASR_TEST_CACHE or DIR

Each does nothing where DIR already holds a finished build (a ``BUILT`` file), and refuses a non-empty DIR
without one. Prints the folder(s) built, one a line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from krasr_batch.testing import build_corpus, build_model, default_cache, ensure, ensure_test_fixtures
from krasr_batch.testing.models import VARIANTS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m krasr_batch.testing", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="build one Whisper checkpoint")
    m.add_argument("variant", choices=list(VARIANTS))
    m.add_argument("dir", type=Path)
    c = sub.add_parser("corpus", help="build a synthetic corpus")
    c.add_argument("dir", type=Path)
    c.add_argument("--long", type=int, default=2, help="long recordings (default 2)")
    c.add_argument("--long-minutes", type=float, default=3.0, help="length of each (default 3)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-bad", action="store_true", help="leave out bad/ and bad.jsonl")
    k = sub.add_parser("cache", help="build the test suite's models and corpus")
    k.add_argument("dir", type=Path, nargs="?", help="default: $KRASR_TEST_CACHE or ~/.cache/krasr-batch-test")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    t0 = time.monotonic()
    if a.command == "models":
        built = [ensure(a.dir, lambda d: build_model(a.variant, d))]
    elif a.command == "corpus":
        built = [ensure(a.dir, lambda d: build_corpus(d, long=a.long, long_minutes=a.long_minutes, seed=a.seed,
                                                      bad=not a.no_bad))]
    else:
        built = list(ensure_test_fixtures(a.dir or default_cache()).values())
    for p in built:
        print(p)
    print(f"ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
