"""One writer per output folder: a run (or a plan) claims ``out`` before it reads or writes anything there.

Two runs into one ``out`` at once would each take the other's files for unfinished work: each redoes every file
(rows doubled), and each one's recovery deletes the other's uncommitted parts and temporary files, so a file
can be committed without its segments. The claim stops the second run before it starts, naming the first.

- **A local folder** (a shared NFS mount too): an exclusive ``flock`` on ``out/.krasr-batch.lock``, held for
  the whole run. The kernel releases it when the process ends, however it ends (``kill -9`` included), so a
  rerun after a crash never meets a stale claim.
- **Object storage** (``s3://``, ``gs://``) has no locks: the claim is a lease, ``out/.krasr-batch.lock``
  holding who runs and rewritten every ``LEASE_S / 4`` seconds. A lease last written within ``LEASE_S`` is
  live; an older one (a killed run) is taken over. Best effort: two runs started within the same second can
  both miss each other.

The file is hidden (pandas, pyarrow, Spark and DuckDB's globs skip it) and left in place on a local disk (the
lock is on the open file, not its existence); a lease is deleted when its run ends.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pyarrow.fs as pafs

from krasr_batch.storage import filesystem, is_uri, join, writing

log = logging.getLogger(__name__)

CLAIM_NAME = ".krasr-batch.lock"
LEASE_S = 120.0  # an object-storage lease not rewritten for this long belongs to a run that is gone


class OutputBusy(RuntimeError):
    """Another krasr-batch run is writing the same ``--out``."""


def _holder(command: str) -> dict[str, Any]:
    return {"command": command, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "heartbeat": time.time()}


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another krasr-batch process"
    return (f"krasr-batch {info.get('command', 'run')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"started {info.get('started', '?')})")


def _busy(out: str, info: dict[str, Any] | None, extra: str = "") -> OutputBusy:
    return OutputBusy(f"{out} is being written by {_describe(info)}{extra}. Two runs into one --out would "
                      "redo each other's files and delete each other's unfinished parts: wait for it to end "
                      "(rerunning then continues where it stopped), or use another --out.")


def _parse(raw: bytes | str) -> dict[str, Any] | None:
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


@contextmanager
def claim_output(out: str, command: str = "run") -> Iterator[None]:
    """Hold ``out`` for this process while the block runs; raise OutputBusy if another run holds it."""
    if is_uri(out):
        with _lease(out, command):
            yield
        return
    path = os.path.join(out, CLAIM_NAME)
    created = not os.path.exists(out)
    with writing(path):
        os.makedirs(out, exist_ok=True)
        fh = open(path, "a+b")
    try:
        with fh:
            yield from _locked(fh, out, path, command)
    finally:
        with suppress(OSError):  # refused before it wrote anything (a model that does not load): no folder left
            if created and os.listdir(out) == [CLAIM_NAME]:
                os.remove(path)
                os.rmdir(out)


def _locked(fh, out: str, path: str, command: str) -> Iterator[None]:
    """The body of :func:`claim_output` on a local folder: lock ``fh`` (``out``'s claim file) for the block,
    or raise OutputBusy naming who holds it."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        raise _busy(out, _parse(fh.read())) from None
    except OSError as e:  # a mount without locks (some FUSE filesystems): run, unguarded, and say so
        log.warning("%s: cannot lock %s (%s): a second run into this folder would not be stopped",
                    out, CLAIM_NAME, os.strerror(e.errno) if e.errno else e)
        yield
        return
    try:
        with writing(path):
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(_holder(command)).encode() + b"\n")
            fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)


def _read_lease(fs: pafs.FileSystem, p: str) -> tuple[dict[str, Any] | None, float | None]:
    """(holder, seconds since the lease was last written) or (None, None) when there is none."""
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return None, None
    try:
        with fs.open_input_stream(p) as f:
            holder = _parse(f.read())
    except (FileNotFoundError, OSError):  # deleted between the two calls: its run just ended
        return None, None
    written = info.mtime.timestamp() if info.mtime else (holder or {}).get("heartbeat")
    return holder, (time.time() - written) if written else None


def _write_lease(fs: pafs.FileSystem, p: str, holder: dict[str, Any]) -> None:
    holder["heartbeat"] = time.time()
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(holder).encode() + b"\n")


@contextmanager
def _lease(out: str, command: str) -> Iterator[None]:
    fs, p = filesystem(join(out, CLAIM_NAME))
    with writing(join(out, CLAIM_NAME)):  # storage out of reach (no network, a wrong endpoint): one line naming it
        holder, age = _read_lease(fs, p)
    if holder is not None and age is not None and age < LEASE_S:
        raise _busy(out, holder, f", last heard from {age:.0f} s ago (a lease older than {LEASE_S:.0f} s is "
                                 "taken to be a run that is gone)")
    if holder is not None:
        log.warning("%s: taking over the lease of %s, silent for %.0f s", out, _describe(holder), age or 0.0)
    mine = _holder(command)
    with writing(join(out, CLAIM_NAME)):
        _write_lease(fs, p, mine)
    again, _ = _read_lease(fs, p)  # a run that wrote its lease just after ours won: the last writer holds it
    if again and (again.get("host"), again.get("pid")) != (mine["host"], mine["pid"]):
        raise _busy(out, again)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_S / 4):
            try:
                _write_lease(fs, p, mine)
            except OSError as e:  # a storage hiccup: the next renewal tries again
                log.warning("cannot renew the lease on %s: %s", out, e)

    thread = threading.Thread(target=renew, name="krasr-output-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            fs.delete_file(p)
        except (FileNotFoundError, OSError):
            pass
