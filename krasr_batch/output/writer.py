"""Writing a run's output: atomic part files, ``run.json`` and ``_SUCCESS``.

Commit protocol (what makes reruns exact and readers safe):
- A file's rows are written only once all its segments are decoded; each flush writes (with word timestamps)
  ``words/part-<run>-<seq>.parquet``, then ``segments/part-<run>-<seq>.parquet`` and then
  ``files/part-<run>-<seq>.parquet``, each first to a hidden
  temporary name (``.tmp-part-….parquet.<random>``, skipped by pyarrow, DuckDB globs, pandas and Spark)
  and then renamed into place.
- A file counts as done when its row is in ``files/``. A rerun reads the done ids and skips them; a
  ``segments/`` part without its ``files/`` twin (a crash between the two renames) is removed first.
- ``run.json`` and ``_SUCCESS`` are written last, when every manifest line has its row.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from krasr_batch.output.layout import TMP_PREFIX, OutputLayout, list_parts, list_tmp
from krasr_batch.schema import SEGMENTS_SCHEMA, WORDS_SCHEMA
from krasr_batch.storage import filesystem, join, writing

log = logging.getLogger(__name__)


def _tmp_name(p: str) -> str:
    head, name = p.rsplit("/", 1)
    return f"{head}/{TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}"


@contextmanager
def _atomic(dest: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """(filesystem, temporary path) to write ``dest`` under; moved into place when the block ends. A failure
    (a full disk, a quota) raises WriteFailed naming ``dest``, and the temporary file is removed."""
    fs, p = filesystem(dest)
    tmp = _tmp_name(p)
    with writing(dest):
        try:
            yield fs, tmp
            fs.move(tmp, p)  # a rename on local disks; on object storage the object appears whole on upload
        except OSError:
            with suppress(OSError):
                fs.delete_file(tmp)
            raise


def _write_atomic_table(table: pa.Table, dest: str) -> None:
    with _atomic(dest) as (fs, tmp):
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")


def write_bytes_atomic(data: bytes, dest: str) -> None:
    with _atomic(dest) as (fs, tmp), fs.open_output_stream(tmp) as f:
        f.write(data)


class PartWriter:
    """Writes finished files' rows as matching ``segments/`` and ``files/`` part files, and ``words/`` parts
    when ``words`` (--word-timestamps)."""

    def __init__(self, layout: OutputLayout, files_schema: pa.Schema, words: bool = False):
        self.layout = layout
        self.files_schema = files_schema
        self.words = words
        self.run_tag = uuid.uuid4().hex[:8]
        self.seq = 0
        for d in (layout.segments, layout.files, layout.work, *([layout.words] if words else [])):
            fs, p = filesystem(d)
            with writing(d):
                fs.create_dir(p, recursive=True)

    def write(self, segment_rows: list[dict], file_rows: list[dict], word_rows: list[dict] | None = None) -> int:
        """Commit finished files; returns how many."""
        if not file_rows:
            return 0
        name = f"part-{self.run_tag}-{self.seq:06d}.parquet"
        self.seq += 1
        if self.words:  # first: a file is done once its files/ row is in, and then all its rows must be
            _write_atomic_table(pa.Table.from_pylist(word_rows or [], schema=WORDS_SCHEMA), join(self.layout.words, name))
        _write_atomic_table(pa.Table.from_pylist(segment_rows, schema=SEGMENTS_SCHEMA), join(self.layout.segments, name))
        _write_atomic_table(pa.Table.from_pylist(file_rows, schema=self.files_schema), join(self.layout.files, name))
        return len(file_rows)


def recover(layout: OutputLayout) -> set[str]:
    """Make ``out`` consistent after an interrupted run; return the ids of files already done."""
    fs, _ = filesystem(layout.out)
    for d in (layout.segments, layout.words, layout.files, layout.out):
        for tmp in list_tmp(d):
            fs.delete_file(tmp)
    files_parts = {p.rsplit("/", 1)[1] for p in list_parts(layout.files)}
    for part in list_parts(layout.segments) + list_parts(layout.words):
        if part.rsplit("/", 1)[1] not in files_parts:
            log.warning("removing %s: written by a run that stopped before committing its files", part)
            fs.delete_file(part)
    if not files_parts:
        return set()
    fs_files, p = filesystem(layout.files)
    ds = pads.dataset(p, filesystem=fs_files, format="parquet")
    ids = ds.to_table(columns=["file_id"]).column("file_id").to_pylist()
    return set(ids)


def drop_failed(layout: OutputLayout, only: set[str]) -> list[str]:
    """Take the rows of failed files (``status`` error) whose id is in ``only`` out of ``files/``, so that the
    run about to start does them again (``--retry-failed``: a mount that was down, storage that throttled);
    returns their ids.

    Each ``files/`` part holding one is rewritten whole under its own name (a temporary file, then a rename:
    a kill leaves the old part or the new one), and its ``segments/`` and ``words/`` twins lose those files'
    rows too, where they have any. Until the run commits them again they count as not done, so a kill in
    between loses nothing: the next run, with or without the flag, does them."""
    fs, _ = filesystem(layout.files)
    dropped: list[str] = []
    wanted = pa.array(sorted(only), pa.string())
    for part in list_parts(layout.files) if only else []:
        table = pq.read_table(part, filesystem=fs)
        failed = pc.and_(pc.equal(table.column("status"), "error"), pc.is_in(table.column("file_id"), value_set=wanted))
        ids = table.filter(failed).column("file_id").to_pylist()
        if not ids:
            continue
        name = part.rsplit("/", 1)[1]
        gone = pa.array(ids, pa.string())
        for twin in (layout.words, layout.segments):  # before files/: a file stays done until its row goes
            twin_fs, twin_dir = filesystem(twin)
            path = f"{twin_dir.rstrip('/')}/{name}"
            if twin_fs.get_file_info(path).type != pafs.FileType.File:
                continue
            rows = pq.read_table(path, filesystem=twin_fs)
            theirs = pc.is_in(rows.column("file_id"), value_set=gone)
            if pc.any(theirs).as_py():
                _write_atomic_table(rows.filter(pc.invert(theirs)), join(twin, name))
        _write_atomic_table(table.filter(pc.invert(failed)), join(layout.files, name))
        dropped.extend(ids)
    return dropped


def write_run_json(layout: OutputLayout, info: dict) -> None:
    write_bytes_atomic((json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n").encode(), layout.run_json)


def mark_success(layout: OutputLayout) -> None:
    write_bytes_atomic(b"", layout.success)


def _remove(path: str) -> None:
    """Delete the file at ``path`` (local or URI) if it is there."""
    fs, p = filesystem(path)
    with suppress(OSError):  # FileNotFoundError among them
        fs.delete_file(p)


def unmark_success(layout: OutputLayout) -> None:
    """Take ``_SUCCESS`` away while a rerun adds files (a new manifest's): readers must not take the folder for
    complete meanwhile."""
    _remove(layout.success)


def clear_output(layout: OutputLayout) -> None:
    """Remove what krasr-batch wrote in ``out`` (for --overwrite)."""
    fs, p = filesystem(layout.out)
    for d in (layout.segments, layout.words, layout.files, layout.work):
        _, dp = filesystem(d)
        try:
            fs.delete_dir(dp)
        except (FileNotFoundError, OSError):
            pass
    for f in (layout.run_json, layout.success):
        _remove(f)
