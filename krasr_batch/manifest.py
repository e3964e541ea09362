"""The manifest: JSON Lines, one audio file per line, validated line by line before any work starts.

Each line is an object with ``path`` (required; relative paths are relative to the manifest's folder),
``id`` (optional, defaults to ``path``), ``language`` (optional, overrides the run's language),
``text`` (optional reference transcript) and any other fields, carried into the files table (a field
named like one of krasr-batch's own columns, e.g. ``duration_s``, becomes ``manifest_duration_s``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from krasr_batch.storage import is_uri

log = logging.getLogger(__name__)

RESERVED = {"path", "id", "language", "text"}
# Columns of the files table that a manifest field may not shadow.
FILES_COLUMNS = {
    "file_id", "path", "status", "error", "error_kind", "warning", "duration_s", "speech_s", "num_segments",
    "text", "reference_text", "language",
}


class ManifestError(ValueError):
    """A manifest line that cannot be used; names the file and line."""

    def __init__(self, manifest: str, line: int, message: str):
        super().__init__(f"{manifest}, line {line}: {message}")
        self.manifest, self.line, self.message = manifest, line, message


@dataclass(frozen=True)
class FileJob:
    """One manifest line, ready to process."""

    file_id: str
    path: str  # absolute local path or a URI
    line: int
    language: str | None = None
    reference_text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _resolve(path: str, base_dir: str) -> str:
    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    if is_uri(base_dir):
        return base_dir.rstrip("/") + "/" + path
    return os.path.normpath(os.path.join(base_dir, path))


def _open_text(manifest: str):
    if is_uri(manifest):
        import io

        from krasr_batch.storage import open_input_stream

        return io.TextIOWrapper(open_input_stream(manifest), encoding="utf-8")
    return open(manifest, encoding="utf-8")


def iter_manifest(manifest: str) -> Iterator[FileJob]:
    """Parse and validate the manifest line by line; raise ManifestError at the first bad line.

    Blank lines are skipped. A duplicate id is an error that names both lines.
    """
    if is_uri(manifest):
        base_dir = manifest.rsplit("/", 1)[0]
    else:
        base_dir = os.path.dirname(os.path.abspath(manifest))
    seen: dict[str, int] = {}
    try:
        fh = _open_text(manifest)
    except OSError as e:
        raise ManifestError(manifest, 0, f"cannot open the manifest: {e.strerror or e}") from e
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except UnicodeDecodeError as e:
                raise ManifestError(manifest, lineno + 1, f"not UTF-8 text ({e.reason})") from e
            if not raw:
                break
            lineno += 1
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(manifest, lineno, f"not valid JSON: {e.msg} at column {e.colno}") from e
            if not isinstance(obj, dict):
                raise ManifestError(manifest, lineno, f"expected a JSON object, got {type(obj).__name__}")
            path = obj.get("path")
            if path is None:
                raise ManifestError(manifest, lineno, "missing required field 'path'")
            if not isinstance(path, str) or not path.strip():
                raise ManifestError(manifest, lineno, "'path' must be a non-empty string")
            file_id = obj.get("id", path)
            if isinstance(file_id, (int, float)) and not isinstance(file_id, bool):
                file_id = str(file_id)
            if not isinstance(file_id, str) or not file_id:
                raise ManifestError(manifest, lineno, "'id' must be a non-empty string")
            if file_id in seen:
                raise ManifestError(manifest, lineno, f"duplicate id {file_id!r} (first on line {seen[file_id]})")
            seen[file_id] = lineno
            language = obj.get("language")
            if language is not None and (not isinstance(language, str) or not language):
                raise ManifestError(manifest, lineno, "'language' must be a non-empty string")
            text = obj.get("text")
            if text is not None and not isinstance(text, str):
                raise ManifestError(manifest, lineno, "'text' must be a string")
            # other fields are carried into the files table; one named like a column krasr-batch writes
            # itself (duration_s, status, ...) is kept as manifest_<name>
            extra = {(f"manifest_{k}" if k in FILES_COLUMNS else k): v for k, v in obj.items() if k not in RESERVED}
            yield FileJob(file_id, _resolve(path, base_dir), lineno, language, text, extra)


@dataclass
class ManifestSummary:
    """What validation learned: how many files, and the Arrow type of each extra field."""

    num_files: int
    extra_types: dict[str, pa.DataType]

    def extra_schema(self) -> list[pa.Field]:
        return [pa.field(k, t) for k, t in self.extra_types.items()]


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    return "json"


def _arrow_type(kinds: set[str]) -> pa.DataType:
    kinds = kinds - {"null"}
    if not kinds:
        return pa.string()
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds <= {"int", "float"}:
        return pa.float64()
    return pa.string()  # strings; anything mixed or nested is kept as JSON text


def convert_extra(value: Any, dtype: pa.DataType) -> Any:
    """A manifest value as it is stored in a column of type ``dtype``."""
    if value is None:
        return None
    if pa.types.is_string(dtype):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_floating(dtype):
        return float(value)
    return value


NORMALIZED_SCHEMA = pa.schema([
    ("file_id", pa.string()),
    ("path", pa.string()),
    ("line", pa.int64()),
    ("language", pa.string()),
    ("reference_text", pa.string()),
    ("extra_json", pa.string()),
])


def normalize_manifest(manifest: str, dest: str, skip_ids: set[str] | None = None,
                       rows_per_group: int = 50_000) -> ManifestSummary:
    """Validate the whole manifest and write it as Parquet (``dest``) in the stable schema the pipeline reads.

    Rows whose id is in ``skip_ids`` (already finished in an earlier run) are validated but not written.
    """
    kinds: dict[str, set[str]] = {}
    n = 0
    buf: dict[str, list] = {name: [] for name in NORMALIZED_SCHEMA.names}
    writer = pq.ParquetWriter(dest, NORMALIZED_SCHEMA)

    def flush() -> None:
        if buf["file_id"]:
            writer.write_table(pa.table(buf, schema=NORMALIZED_SCHEMA))
            for v in buf.values():
                v.clear()

    try:
        for job in iter_manifest(manifest):
            n += 1
            for k, v in job.extra.items():
                kinds.setdefault(k, set()).add(_json_kind(v))
            if skip_ids and job.file_id in skip_ids:
                continue
            buf["file_id"].append(job.file_id)
            buf["path"].append(job.path)
            buf["line"].append(job.line)
            buf["language"].append(job.language)
            buf["reference_text"].append(job.reference_text)
            buf["extra_json"].append(json.dumps(job.extra, ensure_ascii=False) if job.extra else None)
            if len(buf["file_id"]) >= rows_per_group:
                flush()
        flush()
    finally:
        writer.close()
    if n == 0:
        raise ManifestError(manifest, 0, "the manifest holds no entries")
    return ManifestSummary(n, {k: _arrow_type(v) for k, v in sorted(kinds.items())})
