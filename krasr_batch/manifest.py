"""The manifest: one entry per audio file, validated entry by entry before any work starts.

Entries come from any input shape :mod:`krasr_batch.inputs` reads (JSON Lines, NeMo JSON Lines, CSV/TSV,
Parquet, dataset shards, a folder). Each has ``path`` (required, NeMo's ``audio_filepath`` also does; relative
paths are relative to the manifest's folder), ``id`` (optional, defaults to ``path``), ``language`` (optional,
overrides the run's language), ``text`` (optional reference transcript) and any other fields, carried into
the files table (a field named like one of krasr-batch's own columns, e.g. ``duration_s``, becomes
``manifest_duration_s``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from krasr_batch.inputs import PATH_COLUMNS, ManifestError, Record, iter_records
from krasr_batch.schema import FILES_BASE_SCHEMA
from krasr_batch.settings import check_language
from krasr_batch.storage import is_uri, writing

log = logging.getLogger(__name__)

# input_warning: what an input's reader left out and why (a sidecar text not in UTF-8), as `krasr-batch manifest`
# and `submit` write it into the JSON Lines they make of a folder, so that the files/ row holds it still
RESERVED = {"path", "id", "language", "text", "input_warning"}
# Columns of the files table that a manifest field may not shadow, in lower case: Spark (by default) and DuckDB
# take names case-insensitively, so "Text" beside our "text" is a duplicate column to them
FILES_COLUMNS = frozenset(n.lower() for n in FILES_BASE_SCHEMA.names)


@dataclass(frozen=True)
class FileJob:
    """One manifest line, ready to process."""

    file_id: str
    path: str  # absolute local path or a URI
    line: int
    language: str | None = None
    reference_text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None  # what the input's reader left out, and why (a sidecar text not in UTF-8)


def _resolve(path: str, base_dir: str) -> str:
    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    if is_uri(base_dir):
        return base_dir.rstrip("/") + "/" + path
    return os.path.normpath(os.path.join(base_dir, path))


def _text_field(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _job(rec: Record, seen: dict[str, tuple[int, str]], model_languages: Collection[str] | None = None) -> FileJob:
    """Validate one record into a FileJob (``seen``: id -> where it was first, for duplicates; a ``language``
    must be one Whisper knows and, with ``model_languages`` (Whisper codes), one the model has a token for)."""
    obj = rec.fields
    key = next((k for k in PATH_COLUMNS if k in obj), None)
    if key is None:
        raise rec.error("missing required field 'path'")
    path = obj[key]
    if not isinstance(path, str) or not path.strip():
        raise rec.error(f"'{key}' must be a non-empty string")
    if key == "audio_filepath" and obj.get("offset") not in (None, 0, 0.0, "0", "0.0"):
        raise rec.error("NeMo 'offset' (a slice of the recording) is not supported: give one file per line")
    file_id = _text_field(obj.get("id", path))
    if not isinstance(file_id, str) or not file_id:
        raise rec.error("'id' must be a non-empty string")
    if file_id in seen:
        line, unit = seen[file_id]
        raise rec.error(f"duplicate id {file_id!r} (first on {unit} {line})")
    seen[file_id] = (rec.position, rec.unit)
    language = obj.get("language")
    if language is not None:
        if not isinstance(language, str) or not language.strip():
            raise rec.error("'language' must be a non-empty string")
        try:
            code = check_language(language, "'language'")
        except ValueError as e:
            raise rec.error(str(e)) from None
        if code is not None and model_languages is not None and code not in model_languages:
            raise rec.error(f"'language': the model has no language token for {language!r}")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise rec.error("'text' must be a string")
    carried = obj.get("input_warning")
    if carried is not None and not isinstance(carried, str):
        raise rec.error("'input_warning' must be a string")
    # other fields are carried into the files table; one named like a column krasr-batch writes
    # itself (duration_s, status, ...) is kept as manifest_<name>
    extra = {(f"manifest_{k}" if k.lower() in FILES_COLUMNS else k): v for k, v in obj.items()
             if k not in RESERVED and k != key}
    resolved = path if rec.resolved else _resolve(path, rec.base_dir)
    return FileJob(file_id, resolved, rec.position, language, text, extra, rec.warning or carried or None)


def iter_manifest(manifest: str, globs: Sequence[str] = (),
                  model_languages: Collection[str] | None = None) -> Iterator[FileJob]:
    """Read and validate an input of any shape (:mod:`krasr_batch.inputs`) entry by entry; raise
    ManifestError at the first bad one. Blank lines are skipped. A duplicate id is an error naming both places.
    ``model_languages``: the Whisper codes the model has tokens for, when known (see :func:`_job`).
    """
    seen: dict[str, tuple[int, str]] = {}
    for rec in iter_records(manifest, globs):
        yield _job(rec, seen, model_languages)


@dataclass
class ManifestSummary:
    """What validation learned: how many files (and how many of them ``skip_ids`` held), the Arrow type of each
    extra field (``extra_kinds``: the JSON kinds of its values, each with the first line holding one), and how
    many of the files to do came with a warning from their input's reader."""

    num_files: int
    extra_types: dict[str, pa.DataType]
    num_skipped: int = 0
    extra_kinds: dict[str, dict[str, int]] = field(default_factory=dict)
    num_warned: int = 0  # files to do whose entry came with a warning (FileJob.warning), and the first of them
    first_warning: str | None = None

    def extra_schema(self) -> list[pa.Field]:
        return [pa.field(k, t) for k, t in self.extra_types.items()]

    def adopt(self, existing: pa.Schema, manifest: str) -> None:
        """Write each extra field under the type ``existing`` (the output's files/ table, from earlier runs)
        gives it, so that the folder stays one table. A field this manifest fills with values that type cannot
        hold (text where the output has integers) is a ManifestError naming its first such line."""
        for name, dtype in list(self.extra_types.items()):
            if name not in existing.names or existing.field(name).type == dtype:
                continue
            old = existing.field(name).type
            held = _HELD_BY.get(str(old), set())  # a type krasr-batch does not write holds only nulls
            misfit = {k: line for k, line in self.extra_kinds.get(name, {}).items() if k != "null" and k not in held}
            if misfit:
                kind, line = min(misfit.items(), key=lambda kv: kv[1])
                raise ManifestError(manifest, line, f"field {name!r} holds {_KIND_WORDS.get(kind, 'values')} here, "
                                    f"but the output's files/ table holds it as {old} (from an earlier run into "
                                    "this --out): give the field another name, or use another --out")
            self.extra_types[name] = old


# which JSON kinds a column of each Arrow type (as an earlier run wrote it) can hold (``convert_extra``)
_HELD_BY = {"string": {"bool", "int", "float", "str", "json"}, "double": {"int", "float"}, "int64": {"int"},
            "bool": {"bool"}}
_KIND_WORDS = {"str": "text", "json": "lists or objects", "float": "fractional numbers", "int": "integers",
               "bool": "true/false values"}


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
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
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
    ("warning", pa.string()),  # FileJob.warning: it goes on into the file's files/ row
])


def normalize_manifest(manifest: str, dest: str, skip_ids: set[str] | None = None,
                       rows_per_group: int = 50_000, globs: Sequence[str] = (),
                       model_languages: Collection[str] | None = None) -> ManifestSummary:
    """Validate the whole manifest and write it as Parquet (``dest``) in the stable schema the pipeline reads.

    Rows whose id is in ``skip_ids`` (already finished in an earlier run) are validated but not written.
    ``model_languages``: as :func:`iter_manifest`'s.
    """
    kinds: dict[str, dict[str, int]] = {}  # field -> JSON kind -> first line with it
    n = skipped = warned = 0
    first_warning = None
    buf: dict[str, list] = {name: [] for name in NORMALIZED_SCHEMA.names}
    with writing(dest):
        writer = pq.ParquetWriter(dest, NORMALIZED_SCHEMA)

    def flush() -> None:
        if buf["file_id"]:
            with writing(dest):
                writer.write_table(pa.table(buf, schema=NORMALIZED_SCHEMA))
            for v in buf.values():
                v.clear()

    try:
        for job in iter_manifest(manifest, globs, model_languages):
            n += 1
            for k, v in job.extra.items():
                kinds.setdefault(k, {}).setdefault(_json_kind(v), job.line)
            if skip_ids and job.file_id in skip_ids:
                skipped += 1
                continue
            buf["file_id"].append(job.file_id)
            buf["path"].append(job.path)
            buf["line"].append(job.line)
            buf["language"].append(job.language)
            buf["reference_text"].append(job.reference_text)
            buf["extra_json"].append(json.dumps(job.extra, ensure_ascii=False, default=str) if job.extra else None)
            buf["warning"].append(job.warning)
            if job.warning:
                warned += 1
                first_warning = first_warning or job.warning
            if len(buf["file_id"]) >= rows_per_group:
                flush()
        flush()
    finally:
        with writing(dest):
            writer.close()
    if n == 0:
        raise ManifestError(manifest, 0, "the manifest holds no entries")
    return ManifestSummary(n, {k: _arrow_type(set(v)) for k, v in sorted(kinds.items())}, skipped, kinds,
                           warned, first_warning)
