"""``krasr-batch export --format dataset``: a run's segments as training data, in Hugging Face dataset shards.

Each selected segment becomes one row: its audio cut from the source recording (16 kHz mono, the samples the
model saw) as FLAC bytes in an ``audio`` struct (``bytes``, ``path``), its ``text`` and ``language``, its timing
in the source (``file_id``, ``segment_index``, ``start_s``, ``end_s``, ``duration_s``, ``source_path``) and the
quality signals (``avg_logprob``, ``compression_ratio``, ``no_speech_prob``, ``suspect``, ``truncated``,
``truncation``, ``num_tokens``). The shards (``data-00000.parquet``, ...) carry the ``huggingface`` schema
metadata, so ``datasets.load_dataset("parquet", data_files=...)`` loads ``audio`` as an ``Audio`` feature.

Only segments of ``ok`` files are taken, and of those the ones ``where`` (a DuckDB SQL expression over the
segment's columns and its file's other columns, e.g. ``not suspect and avg_logprob > -0.6`` or
``category = 'kk'``) selects. DuckDB scans the output's Parquet parts through pyarrow datasets, so the
selection is streamed; each source recording is decoded once (:func:`krasr_batch.audio.decode_with_fallback`,
as the run decoded it) for all its selected segments.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from krasr_batch.audio import SAMPLE_RATE, AudioError, decode_with_fallback
from krasr_batch.output.layout import TMP_PREFIX
from krasr_batch.output.reader import RunOutput
from krasr_batch.storage import filesystem, join

log = logging.getLogger(__name__)

ROWS_PER_SHARD = 2000
ROWS_PER_GROUP = 100  # as `datasets` writes audio datasets: a reader holds about one group of audio at once
SHARD_PREFIX = "data-"

DATASET_SCHEMA = pa.schema([
    ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("text", pa.string()),
    ("language", pa.string()),
    ("file_id", pa.string()),
    ("segment_index", pa.int32()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("duration_s", pa.float64()),
    ("source_path", pa.string()),
    ("num_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("truncation", pa.string()),
    ("avg_logprob", pa.float64()),
    ("compression_ratio", pa.float64()),
    ("no_speech_prob", pa.float64()),
    ("suspect", pa.bool_()),
])
_VALUE_TYPES = {pa.string(): "string", pa.int32(): "int32", pa.float64(): "float64", pa.bool_(): "bool"}
# the `datasets` library's description of the columns, kept in the Parquet schema metadata
HF_FEATURES = {"audio": {"sampling_rate": SAMPLE_RATE, "_type": "Audio"},
               **{f.name: {"dtype": _VALUE_TYPES[f.type], "_type": "Value"} for f in DATASET_SCHEMA if f.name != "audio"}}
SEGMENT_INPUT_COLUMNS = ("file_id", "segment_index", "path", "start_s", "end_s", "text", "language", "num_tokens",
                         "truncated", "truncation", "avg_logprob", "compression_ratio", "no_speech_prob", "suspect")


class ExportError(ValueError):
    """The selection cannot be made: a bad ``where`` expression, or DuckDB missing."""


@dataclass(frozen=True)
class DatasetExport:
    directory: str
    shards: tuple[str, ...]
    files: int
    segments: int
    failed_files: int  # source recordings that could not be decoded again (their segments are left out)


def encode_flac(audio: np.ndarray) -> bytes:
    """16 kHz mono float32 samples as 16-bit FLAC (int16 = round(x * 32768), clipped: 16-bit sources round-trip)."""
    import soundfile as sf

    pcm = np.clip(np.round(np.asarray(audio, np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def cut_spans(path: str, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """The samples of each ``(start, end)`` span (16 kHz sample indices) of one recording, decoded once."""

    def consume(blocks: Iterator[np.ndarray]) -> list[np.ndarray]:
        pieces: list[list[np.ndarray]] = [[] for _ in spans]
        offset = 0
        for block in blocks:
            end = offset + len(block)
            for k, (s, e) in enumerate(spans):
                if s < end and e > offset:
                    pieces[k].append(block[max(s - offset, 0):min(e, end) - offset])
            offset = end
        return [np.concatenate(p) if p else np.zeros(0, np.float32) for p in pieces]

    _, out = decode_with_fallback(path, consume)
    return out


def _selection(output: RunOutput, where: str | None) -> pa.RecordBatchReader:
    """Segments of ok files that ``where`` selects, in (file_id, segment_index) order, as DuckDB streams them."""
    try:
        import duckdb
    except ImportError as e:
        raise ExportError("export --format dataset needs DuckDB: pip install 'krasr-batch[dataset]'") from e
    seg_cols = output.segments_columns
    file_cols = output.files_columns
    con = duckdb.connect()
    con.register("segments", pads.dataset(list(output.segments_parts), schema=output.segments_schema,
                                          filesystem=output.fs, format="parquet"))
    con.register("files", pads.dataset(list(output.files_parts), schema=output.files_schema,
                                       filesystem=output.fs, format="parquet"))
    quote = lambda name: '"' + name.replace('"', '""') + '"'
    clash = [c for c in file_cols if c in seg_cols]
    exclude = f" exclude ({', '.join(quote(c) for c in clash)})" if clash else ""
    inner = (f"select s.*, f.*{exclude} from segments s join files f on s.file_id = f.file_id "
             "where f.status = 'ok'")
    condition = f"where ({where})" if where and where.strip() else ""
    query = f"select * from ({inner}) {condition} order by file_id, segment_index"
    try:
        rel = con.sql(query)
        if hasattr(rel, "to_arrow_reader"):  # DuckDB 2
            return rel.to_arrow_reader(ROWS_PER_GROUP)
        return rel.fetch_arrow_reader(ROWS_PER_GROUP)  # DuckDB 1.x
    except duckdb.Error as e:
        raise ExportError(f"--where {where!r}: {str(e).splitlines()[0]}") from None


def _rows_by_file(reader: pa.RecordBatchReader) -> Iterator[list[dict]]:
    """The selected segment rows, one list per file (the selection is ordered by file)."""
    current: list[dict] = []
    for batch in reader:
        for row in batch.select([c for c in SEGMENT_INPUT_COLUMNS if c in batch.schema.names]).to_pylist():
            if current and row["file_id"] != current[0]["file_id"]:
                yield current
                current = []
            current.append(row)
    if current:
        yield current


class _ShardWriter:
    """Writes rows into ``data-NNNNN.parquet`` shards of ROWS_PER_SHARD rows, each under a hidden name first."""

    def __init__(self, directory: str):
        self.fs, self.root = filesystem(directory)
        self.directory = directory
        self.fs.create_dir(self.root, recursive=True)
        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):  # an earlier export's shards
            if info.base_name.startswith(SHARD_PREFIX) and info.base_name.endswith(".parquet"):
                self.fs.delete_file(info.path)
        self.schema = DATASET_SCHEMA.with_metadata(
            {"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})
        self.rows: list[dict] = []
        self.shards: list[str] = []
        self.count = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= ROWS_PER_SHARD:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{SHARD_PREFIX}{len(self.shards):05d}.parquet"
        final = f"{self.root.rstrip('/')}/{name}"
        tmp = f"{self.root.rstrip('/')}/{TMP_PREFIX}{name}"
        pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), tmp, filesystem=self.fs,
                       row_group_size=ROWS_PER_GROUP)
        self.fs.move(tmp, final)
        self.shards.append(join(self.directory, name))
        self.rows = []


def export_dataset(output: RunOutput, to: str | None = None, where: str | None = None) -> DatasetExport:
    """Write the selected segments of ``output`` as dataset shards under ``to`` (default OUT/export/dataset/)."""
    directory = to or join(output.out, "export", "dataset")
    reader = _selection(output, where) if output.segments_parts else None
    writer = _ShardWriter(directory)
    files = failed = 0
    for rows in _rows_by_file(reader) if reader is not None else ():
        spans = [(round(r["start_s"] * SAMPLE_RATE), round(r["end_s"] * SAMPLE_RATE)) for r in rows]
        try:
            pieces = cut_spans(rows[0]["path"], spans)
        except (AudioError, OSError) as e:
            log.warning("%s: cannot decode it again, its %d segments are left out: %s", rows[0]["file_id"],
                        len(rows), e)
            failed += 1
            continue
        files += 1
        for r, audio in zip(rows, pieces):
            name = f"{r['file_id']}-{r['segment_index']:06d}.flac"
            writer.add({"audio": {"bytes": encode_flac(audio), "path": name}, "text": r["text"],
                        "language": r["language"], "file_id": r["file_id"], "segment_index": r["segment_index"],
                        "start_s": r["start_s"], "end_s": r["end_s"], "duration_s": len(audio) / SAMPLE_RATE,
                        "source_path": r["path"], **{k: r.get(k) for k in (
                            "num_tokens", "truncated", "truncation", "avg_logprob", "compression_ratio",
                            "no_speech_prob", "suspect")}})
    writer.flush()
    log.info("exported %d segments of %d files to %s", writer.count, files, directory)
    return DatasetExport(directory, tuple(writer.shards), files, writer.count, failed)
