"""Audio held inside Hugging Face dataset Parquet shards: the ``audio`` struct column (``bytes``, ``path``).

A shard row is named by a path of its own, ``<shard>.parquet#row=<N>`` (:func:`shard_ref`), so it travels
through the manifest, the pipeline and the ``files/`` table like any other path. A worker reads the row's
bytes with :func:`read_row_audio`: one row group of the ``audio`` column, from local disk or object storage,
kept per process for the next rows of the same group (consecutive rows go to the same task). Nothing is
written to a temporary file; decoders read the bytes from memory.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from krasr_batch.storage import filesystem, is_uri

AUDIO_COLUMN = "audio"
_REF = re.compile(r"^(?P<shard>.+\.parquet)#row=(?P<row>\d+)$", re.IGNORECASE)


def shard_ref(shard: str, row: int) -> str:
    """The path naming row ``row`` (0-based, within the shard) of a dataset shard."""
    return f"{shard}#row={row}"


def parse_ref(path: str) -> tuple[str, int] | None:
    """(shard, row) for a path made by :func:`shard_ref`, else None."""
    m = _REF.match(path)
    return (m["shard"], int(m["row"])) if m else None


def is_audio_struct(field: pa.Field) -> bool:
    """The ``audio`` column of a dataset shard: a struct holding ``bytes`` (binary) and ``path``."""
    t = field.type
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return "bytes" in names and (pa.types.is_binary(names["bytes"]) or pa.types.is_large_binary(names["bytes"]))


@dataclass(frozen=True)
class RowAudio:
    """What one shard row holds: its audio's bytes (None when the dataset stores a path only) and ``path``."""

    data: bytes | None
    path: str | None


class ShardRowError(Exception):
    """The row is not in the shard, or the shard has no audio column."""


@functools.lru_cache(maxsize=16)
def _row_group_starts(shard: str) -> tuple[int, ...]:
    """First row of each row group, and the row count last (from the footer only)."""
    fs, p = filesystem(shard)
    with fs.open_input_file(p) as f:
        meta = pq.ParquetFile(f).metadata
    starts, n = [], 0
    for i in range(meta.num_row_groups):
        starts.append(n)
        n += meta.row_group(i).num_rows
    return (*starts, n)


@functools.lru_cache(maxsize=2)
def _row_group_audio(shard: str, group: int) -> pa.StructArray:
    fs, p = filesystem(shard)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        if pf.schema_arrow.get_field_index(AUDIO_COLUMN) < 0:
            raise ShardRowError(f"{shard} has no '{AUDIO_COLUMN}' column")
        return pf.read_row_group(group, columns=[AUDIO_COLUMN]).column(0).combine_chunks()


def read_row_audio(shard: str, row: int) -> RowAudio:
    """The audio of row ``row`` of ``shard``. Raises ShardRowError, or OSError when the shard is unreadable."""
    starts = _row_group_starts(shard)
    if not 0 <= row < starts[-1]:
        raise ShardRowError(f"{shard} has {starts[-1]} rows, no row {row}")
    group = bisect.bisect_right(starts, row) - 1
    value = _row_group_audio(shard, group)[row - starts[group]].as_py() or {}
    return RowAudio(value.get("bytes"), value.get("path"))


def resolve_beside(shard: str, path: str) -> str:
    """A row's own ``path`` (when it has no bytes), relative to the shard's folder unless absolute or a URI."""
    if is_uri(path) or path.startswith("/"):
        return path
    head = shard.rsplit("/", 1)[0] if "/" in shard else "."
    return f"{head}/{path}"
