"""Build a fixture once per machine: a file lock, a scratch folder, a ``BUILT`` marker, one rename.

Contract of :func:`ensure`: ``out`` is returned only once ``out/BUILT`` exists. The builder writes into
``out.partial`` (removed first if a killed build left it), and ``BUILT`` is its last file; the finished folder is
then renamed to ``out``, so a reader never sees half a fixture. Concurrent callers (pytest-xdist workers, several
test runs) serialize on ``.{name}.lock`` beside ``out``; whoever comes second finds the marker and returns.
An ``out`` without ``BUILT`` (an older or unfinished build) is replaced only when ``replace_unfinished`` is set;
otherwise, if it holds anything, :class:`FileExistsError` is raised rather than deleting what may be someone's.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from krasr_batch.storage import file_lock

MARKER = "BUILT"


def default_cache() -> Path:
    """Where the tests keep their fixtures: ``$KRASR_TEST_CACHE``, else ``~/.cache/krasr-batch-test``."""
    return Path(os.environ.get("KRASR_TEST_CACHE") or Path.home() / ".cache" / "krasr-batch-test").expanduser()


def is_built(out: Path) -> bool:
    return (out / MARKER).is_file()


def ensure(out: str | Path, build: Callable[[Path], object], replace_unfinished: bool = False) -> Path:
    """Return ``out`` once built, calling ``build(scratch_folder)`` if it is not (see the module docstring)."""
    out = Path(out).expanduser().absolute()
    if is_built(out):
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if is_built(out):
            return out
        if out.exists() and any(out.iterdir()) and not replace_unfinished:
            raise FileExistsError(f"{out} exists and holds no finished build ({MARKER}); remove it or pick another")
        scratch = out.with_name(out.name + ".partial")
        if scratch.exists():
            shutil.rmtree(scratch)
        build(scratch)
        if not is_built(scratch):
            raise RuntimeError(f"the build into {scratch} finished without writing {MARKER}")
        if out.exists():
            shutil.rmtree(out)
        scratch.rename(out)
    return out
