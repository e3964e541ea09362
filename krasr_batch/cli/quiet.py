"""A run's terminal shows krasr-batch's own lines only: Ray's messages go to a log file under ``--out``.

Ray writes to this process's standard error from Python (its loggers: the token-authentication notice,
Ray Data's executor lines) and from C++ (the core worker's ``core_worker.cc`` lines), and to its standard
output the errors the raylet and the autoscaler push to the driver (``(raylet) Task ... submit failed``,
seen after a SIGTERM), so the redirection is of file descriptors 2 and 1 themselves, for the length of the
run. krasr-batch's progress line and its own warnings go to the terminal through a copy of the original
standard error. When the run ends, the log is read back and a real problem among Ray's lines (an error or
a traceback, less the known harmless ones below) is surfaced as one line with the log's path. ``-v`` turns
all of this off: everything goes to the terminal as before.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from krasr_batch.storage import is_uri

# Lines Ray writes on every healthy run: never surfaced.
HARMLESS = (
    re.compile(r"Token authentication is enabled"),
    # Ray Data's actor pool always puts its map function in the object store; the class carries our settings
    # itself (pipeline.stages.model_stage_class), so a restarted actor never needs those arguments
    re.compile(r"has constructor arguments in the object store and max_restarts > 0"),
    re.compile(r"Progress bars disabled"),
    re.compile(r"streaming_executor"),
    re.compile(r"Started a local Ray instance"),
)
PROBLEM = re.compile(r"(\bERROR\b|Traceback \(most recent call last\)|^\[[^\]]* E \d+ \d+\]|\bFATAL\b)")


@dataclass
class Console:
    """Where a run's own lines go while Ray's go to ``log_path`` (None: everything to the terminal)."""

    stream: object = field(default_factory=lambda: sys.stderr)
    log_path: str | None = None
    problems: list[str] = field(default_factory=list)


def log_path_for(out: str) -> str:
    """``OUT/logs/run-<UTC time>.log`` for a local ``out``; a local temporary file for a URI (the log is local)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if is_uri(out):
        return _temporary_log(stamp)
    return os.path.join(out, "logs", f"run-{stamp}.log")


def _temporary_log(stamp: str) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"krasr-batch-run-{stamp}-{os.getpid()}.log")


def problems_in(text: str) -> list[str]:
    """Lines of a Ray log that tell of a real problem: errors and tracebacks that are not known harmless."""
    return [line.strip() for line in text.splitlines()
            if PROBLEM.search(line) and not any(h.search(line) for h in HARMLESS)]


@contextmanager
def quiet_ray(out: str, verbose: bool):
    """Send file descriptors 2 and 1 to a log file under ``out`` for the block; yields a :class:`Console`."""
    if verbose:
        yield Console()
        return
    final = log_path_for(out)
    # written in the temporary folder first: a run refused before it writes anything leaves --out untouched
    path = _temporary_log(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    sys.stderr.flush()
    sys.stdout.flush()
    saved, saved_out = os.dup(2), os.dup(1)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                         errors="replace")
    ours = logging.StreamHandler(terminal)
    ours.setFormatter(logging.Formatter("krasr-batch: %(levelname)s: %(message)s"))
    ours.setLevel(logging.WARNING)
    pkg = logging.getLogger("krasr_batch")
    propagate = pkg.propagate
    pkg.addHandler(ours)
    pkg.propagate = False  # our warnings on the terminal, not in Ray's log
    console = Console(terminal, path)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        os.dup2(f.fileno(), 1)
    try:
        yield console
    finally:
        sys.stderr.flush()
        sys.stdout.flush()  # what Ray printed is written to the log, not held for the terminal
        os.dup2(saved, 2)
        os.dup2(saved_out, 1)
        os.close(saved)
        os.close(saved_out)
        pkg.removeHandler(ours)
        pkg.propagate = propagate
        terminal.flush()
        terminal.close()
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                console.problems = problems_in(f.read())
        except OSError:
            pass
        if final != path and os.path.isdir(out):  # the run wrote its output folder: the log goes beside it
            try:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                shutil.move(path, final)
                console.log_path = final
            except OSError:  # a full disk, a read-only folder: the log stays in the temporary folder (log_path)
                with suppress(OSError):
                    os.remove(final)  # a half copy
        elif not is_uri(out) and not console.problems:  # refused before --out existed, nothing worth keeping
            with suppress(OSError):
                os.remove(path)
            console.log_path = None
