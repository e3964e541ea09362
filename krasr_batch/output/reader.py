"""Reading a run's output folder: :func:`open_output` and :class:`RunOutput`.

:func:`open_output` checks that a folder (local path or ``s3://``/``gs://`` URI) holds krasr-batch output
and returns a :class:`RunOutput` that reads ``files/``, ``segments/``, ``words/`` and ``run.json``. Only committed
``part-*.parquet`` files are read (never the hidden ``.tmp-…`` files of a run in progress), and their
schemas are unified, so parts written with and without newer columns (``suspect``, ``avg_logprob``, …)
read together, the missing values as nulls. :func:`suspect_flags` tells suspect segments also in parts
written before the ``suspect`` column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from krasr_batch.output.layout import OutputLayout, list_parts, read_text
from krasr_batch.quality import suspect
from krasr_batch.storage import filesystem

log = logging.getLogger(__name__)

SUSPECT_INPUTS = ("suspect", "avg_logprob", "no_speech_prob")


class OutputError(Exception):
    """OUT_DIR is missing, not a folder, or holds no committed krasr-batch output."""


def _unified_schema(fs: pafs.FileSystem, parts: list[str]) -> pa.Schema:
    """The schema of ``parts``, unified. The parts of one run (``part-<run>-<seq>.parquet``) share its writer's
    schema, so one footer is read per run, not per part: a rerun of a long job (a part every 20 s, about
    13,000 in three days) would otherwise fetch every footer at start, one request each on object storage."""
    one_per_run = {p.rsplit("/", 1)[-1].rsplit("-", 1)[0]: p for p in reversed(parts)}
    schemas = [pq.read_schema(p, filesystem=fs) for p in one_per_run.values()]
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (TypeError, pa.ArrowInvalid):  # older pyarrow, or types that cannot be promoted
        return pa.unify_schemas(schemas)


@dataclass(frozen=True)
class RunOutput:
    """A run's output folder, opened for reading (see :func:`open_output`)."""

    out: str
    fs: pafs.FileSystem
    files_parts: tuple[str, ...]
    segments_parts: tuple[str, ...]
    words_parts: tuple[str, ...] = ()  # words/ parts (runs with --word-timestamps), named as their segments/ twins

    @cached_property
    def files_schema(self) -> pa.Schema:
        """The files/ schema, unified over all parts."""
        return _unified_schema(self.fs, list(self.files_parts))

    @cached_property
    def segments_schema(self) -> pa.Schema:
        """The segments/ schema, unified over all parts (empty when there are none)."""
        return _unified_schema(self.fs, list(self.segments_parts)) if self.segments_parts else pa.schema([])

    @property
    def files_columns(self) -> list[str]:
        return self.files_schema.names

    @property
    def segments_columns(self) -> list[str]:
        return self.segments_schema.names

    def files_table(self, columns: Iterable[str]) -> pa.Table:
        """The files/ rows with those of ``columns`` that exist."""
        ds = pads.dataset(list(self.files_parts), schema=self.files_schema, filesystem=self.fs, format="parquet")
        return ds.to_table(columns=[c for c in columns if c in self.files_schema.names])

    def segment_batches(self, columns: Iterable[str]) -> Iterator[pa.RecordBatch]:
        """segments/ rows in record batches (streamed, part by part), with the ``columns`` that exist."""
        if not self.segments_parts:
            return
        ds = pads.dataset(list(self.segments_parts), schema=self.segments_schema, filesystem=self.fs,
                          format="parquet")
        yield from ds.to_batches(columns=[c for c in columns if c in self.segments_schema.names])

    def segment_parts(self, columns: Iterable[str]) -> Iterator[tuple[str, pa.Table]]:
        """Each ``segments/`` part (path, rows with the ``columns`` that exist), one at a time."""
        names = [c for c in columns if c in self.segments_schema.names]
        for part in self.segments_parts:
            ds = pads.dataset([part], schema=self.segments_schema, filesystem=self.fs, format="parquet")
            yield part, ds.to_table(columns=names)

    def words_of_part(self, segments_part: str) -> dict[tuple[str, int], list[dict]]:
        """The words committed with one ``segments/`` part (its ``words/`` twin), by (file_id, segment_index),
        each list in word order; {} when the run has no words."""
        name = segments_part.rsplit("/", 1)[-1]
        part = next((p for p in self.words_parts if p.rsplit("/", 1)[-1] == name), None)
        if part is None:
            return {}
        out: dict[tuple[str, int], list[dict]] = {}
        for r in pq.read_table(part, filesystem=self.fs).to_pylist():
            out.setdefault((r["file_id"], r["segment_index"]), []).append(r)
        for words in out.values():
            words.sort(key=lambda r: r["word_index"])
        return out

    def run_info(self) -> dict[str, Any] | None:
        """run.json, or None when the run has not finished (or the file is unreadable)."""
        text = read_text(OutputLayout(self.out).run_json)
        try:
            return json.loads(text) if text is not None else None
        except ValueError as e:
            log.debug("no usable run.json in %s: %s", self.out, e)
            return None

    @property
    def complete(self) -> bool:
        """True when the run wrote ``_SUCCESS`` (every manifest line has its row)."""
        _, p = filesystem(OutputLayout(self.out).success)
        return self.fs.get_file_info(p).type == pafs.FileType.File


def open_output(out: str) -> RunOutput:
    """Open a run's output folder; raise :class:`OutputError` when there is nothing to read."""
    fs, p = filesystem(out)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise OutputError(f"{out} does not exist")
    if info.type != pafs.FileType.Directory:
        raise OutputError(f"{out} is not a folder")
    layout = OutputLayout(out)
    files_parts = list_parts(layout.files)
    if not files_parts:
        raise OutputError(f"{out} holds no files/part-*.parquet: not a krasr-batch output folder, "
                          "or no file has been committed yet")
    return RunOutput(out, fs, tuple(files_parts), tuple(list_parts(layout.segments)), tuple(list_parts(layout.words)))


# ---------------------------------------------------------------- suspect segments

def column(batch: pa.RecordBatch, name: str) -> list | None:
    idx = batch.schema.get_field_index(name)
    return batch.column(idx).to_pylist() if idx >= 0 else None


def suspect_flags(batch: pa.RecordBatch) -> list[bool]:
    """Per segment: the ``suspect`` column where it holds a value, else :func:`krasr_batch.quality.suspect`
    of the text and duration (with ``avg_logprob`` / ``no_speech_prob`` when those columns exist)."""
    n = batch.num_rows
    given = column(batch, "suspect") or [None] * n
    texts = column(batch, "text") or [None] * n
    starts = column(batch, "start_s") or [None] * n
    ends = column(batch, "end_s") or [None] * n
    logprobs = column(batch, "avg_logprob") or [None] * n
    no_speech = column(batch, "no_speech_prob") or [None] * n
    out = []
    for i in range(n):
        if given[i] is not None:
            out.append(bool(given[i]))
            continue
        dur = ends[i] - starts[i] if starts[i] is not None and ends[i] is not None else None
        out.append(suspect(texts[i], dur, logprobs[i], no_speech[i]))
    return out


def suspect_file_ids(output: RunOutput) -> set[str]:
    """The ids of files holding at least one suspect segment."""
    ids: set[str] = set()
    for batch in output.segment_batches(["file_id", "text", "start_s", "end_s", *SUSPECT_INPUTS]):
        fids = batch.column(batch.schema.get_field_index("file_id")).to_pylist()
        ids.update(fid for fid, bad in zip(fids, suspect_flags(batch)) if bad)
    return ids
