"""The shapes an input comes in, each read as a stream of records for :mod:`krasr_batch.manifest` to validate.

An input is detected from what it is, then from its extension, then from its columns:

- a folder, or an object-storage prefix (``s3://bucket/prefix/``): the tree is walked, each folder's entries in
  name order, depth first; audio and video files (:data:`MEDIA_EXTENSIONS`) are taken, ``globs`` narrow them
  (``fnmatch`` on the path relative to the folder, where ``*`` also crosses ``/``). A file's id is that relative
  path; a sidecar ``NAME.txt`` beside ``NAME.wav`` is its reference text (one not in UTF-8 is left out, with a
  ``sidecar`` warning in the record, and the file is still transcribed). Hidden entries (``.name``) are skipped.
  A symbolic link to nothing is listed all the same: its run reports it (``not_found``) rather than skip it.
  One folder's listing is held at a time, never the whole tree's;
- ``*.csv`` / ``*.tsv``: a header line, then one row per file (``path``; ``id``, ``language``, ``text`` when
  present; empty cells count as absent); the header tells a .csv separated by semicolons (Excel's, where a
  comma is the decimal mark);
- ``*.parquet``: a table with the same columns, or a Hugging Face dataset shard, told by its ``audio`` struct
  column (``bytes``, ``path``): each row becomes the path ``SHARD#row=N`` (:mod:`krasr_batch.shards`), its id the
  audio's ``path``, else its row number counted over all the shards given;
- one audio or video file (:data:`MEDIA_EXTENSIONS`; ``krasr-batch run interview.mp3``): a manifest of one entry,
  its id the file's name, its sidecar ``NAME.txt`` its text, as in a folder;
- a glob (``data/test-*.parquet``, ``calls/*/*.wav``, ``calls/**/*.mp3``: ``**`` any depth of folders, on a
  local disk): the matching files in name order, each read by its own shape; a media file's id is then its
  path from the pattern's folder (the part before any wildcard), a ``NAME.txt`` matched beside a matched
  ``NAME.wav`` is its sidecar, not an input, and a match of no input shape by its name (``readme.md``) is
  left out, as in a folder;
- ``*.jsonl`` / ``*.json`` / ``*.ndjson``: JSON Lines, krasr-batch's own or NeMo's (``audio_filepath``, ``text``,
  ``duration``);
- anything else (a ``.txt`` or ``.lst`` file, a file without extension, standard input): JSON Lines if its
  first line that is not blank opens an object (``{``), else a list of paths, one a line, as ``find`` writes
  them (surrounding spaces are not part of a path; blank lines are skipped).

A text input (JSON Lines, CSV, TSV, a list of paths) may be compressed, told by a last extension of
:data:`COMPRESSIONS` (``manifest.jsonl.gz``, ``files.txt.zst``): it is read through the codec, as a stream.
"""

from __future__ import annotations

import csv
import fnmatch
import glob as globlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from krasr_batch.shards import AUDIO_COLUMN, is_audio_struct, shard_ref
from krasr_batch.storage import filesystem, is_uri, open_input_stream, printable_path

log = logging.getLogger(__name__)

# what a folder walk takes: audio, and video whose audio stream PyAV decodes
MEDIA_EXTENSIONS = frozenset({
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aiff", ".aif", ".amr", ".3gp",
    ".wv", ".ac3", ".mka", ".caf", ".au", ".webm", ".mp4", ".m4v", ".mkv", ".mov", ".avi", ".mpg", ".mpeg", ".ts",
    ".flv", ".mp2", ".m4b", ".aifc", ".w64", ".wmv", ".mts",
})
SIDECAR_EXTENSION = ".txt"
PATH_COLUMNS = ("path", "audio_filepath")  # krasr-batch's name, and NeMo's
SIDECAR_READERS = 16  # sidecar texts read at once from object storage
GLOB_CHARS = "*?["


def _local_entries(directory: str) -> list[tuple[str, str, bool, bool]]:
    """(name, path, is a folder, is a regular file) of each entry of a local folder. Everything but a folder
    is a candidate: a dangling symbolic link or a FIFO named like audio fails as its file's row."""
    with os.scandir(directory) as it:
        return [(e.name, e.path, e.is_dir(), e.is_file()) for e in it]


STDIN = "-"  # a manifest read from standard input (JSON Lines or paths; relative paths from the current folder)
JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}  # a text input's, by its extension


def compression(source: str) -> str | None:
    """The codec a text input is compressed with, by its last extension, or None."""
    return None if source == STDIN else COMPRESSIONS.get(os.path.splitext(source.lower())[1])


class ManifestError(ValueError):
    """An input that cannot be used; names the file and the line (or row) at fault, 0 for the whole file."""

    def __init__(self, manifest: str, line: int | None, message: str, unit: str = "line"):
        whole = line is None or (line == 0 and unit == "line")  # 0: the whole file (rows count from 0)
        shown = "<stdin>" if manifest == STDIN else manifest
        super().__init__(f"{shown}: {message}" if whole else f"{shown}, {unit} {line}: {message}")
        self.manifest, self.line, self.message, self.unit = manifest, line, message, unit


@dataclass(frozen=True)
class Record:
    """One entry of an input, before validation: its fields, and where it came from (for errors)."""

    fields: dict[str, Any]
    source: str  # the file it was read from (the folder, for a walk)
    position: int  # line of a JSONL or CSV file, row of a Parquet file (from 0), entry of a walk (from 1)
    unit: str = "line"
    base_dir: str = ""  # what relative paths are relative to
    resolved: bool = field(default=False)  # the path is already absolute (walks, shards)
    warning: str | None = None  # what the reader left out of the entry and why (a sidecar text not in UTF-8)

    def error(self, message: str) -> ManifestError:
        return ManifestError(self.source, self.position, message, self.unit)


# ---------------------------------------------------------------- which shape

def is_glob(source: str) -> bool:
    return any(c in source.rsplit("/", 1)[-1] for c in GLOB_CHARS)


def is_folder(source: str) -> bool:
    """A local folder, or a URI that names a prefix (ends in ``/``) or a directory of its filesystem."""
    if not is_uri(source):
        return os.path.isdir(os.path.expanduser(source))
    if source.endswith("/"):
        return True
    try:
        fs, p = filesystem(source)
        return fs.get_file_info(p).type == pafs.FileType.Directory
    except (OSError, ValueError):
        return False


def input_kind(source: str) -> str:
    """``folder``, ``glob``, ``csv``, ``tsv``, ``parquet``, ``media`` (one audio or video file), ``jsonl``, or
    ``lines`` (the default, and standard input's: JSON Lines or a list of paths, told by its first line)."""
    if source == STDIN:
        return "lines"
    if is_folder(source):
        return "folder"
    if is_glob(source):
        return "glob"
    lower = source.lower()
    if compression(source):  # a compressed text: told by the extension before the codec's
        lower = os.path.splitext(lower)[0]
        return next((ext for ext in ("csv", "tsv") if lower.endswith(f".{ext}")), None) or (
            "jsonl" if lower.endswith(JSONL_EXTENSIONS) else "lines")
    for ext in ("csv", "tsv", "parquet"):
        if lower.endswith(f".{ext}"):
            return ext
    if lower.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if os.path.splitext(lower.rsplit("/", 1)[-1])[1] in MEDIA_EXTENSIONS:
        return "media"
    return "lines"


def iter_records(source: str, globs: Sequence[str] = ()) -> Iterator[Record]:
    """Every entry of ``source`` in order, as it is read (streamed: nothing is held for the whole input)."""
    if not is_uri(source):
        source = os.path.expanduser(source)
    kind = input_kind(source)
    if globs and kind != "folder":
        raise ManifestError(source, 0, "--glob narrows a folder input; this is not a folder")
    if kind == "folder":
        try:
            yield from walk_folder(source, globs)
        except OSError as e:  # object storage out of reach, a mount gone: one line naming the folder
            raise ManifestError(source, 0, f"cannot list it: {e}") from e
    elif kind == "glob":
        try:
            files = expand_glob(source)
        except OSError as e:
            raise ManifestError(source, 0, f"cannot list it: {e}") from e
        if not files:
            raise ManifestError(source, 0, "no file matches this pattern")
        counter = [0]
        kinds = {f: input_kind(f) for f in files}
        media_stems = {os.path.splitext(f)[0] for f, k in kinds.items() if k == "media"}
        root = glob_root(source)
        for f in files:
            if kinds[f] == "lines" and f.lower().endswith(SIDECAR_EXTENSION) and f[:-4] in media_stems:
                continue  # NAME.txt beside a matched NAME.wav: its text, read with it
            if kinds[f] == "lines" and not _list_name(f):
                continue  # readme.md, notes.pdf: no input, as in a folder
            yield from _read_file(f, kinds[f], counter, root, source)
    else:
        yield from _read_file(source, kind, [0])


def _read_file(source: str, kind: str, counter: list[int], root: str | None = None,
               pattern: str | None = None) -> Iterator[Record]:
    if kind == "csv" or kind == "tsv":
        return read_csv(source, "," if kind == "csv" else "\t")
    if kind == "parquet":
        return read_parquet(source, counter)
    if kind == "media":
        return read_media_file(source, counter, root, pattern)
    if kind in ("folder", "glob"):
        raise ManifestError(source, 0, "a pattern's matches must be files")
    return read_jsonl(source, sniff=kind == "lines")


LIST_EXTENSIONS = ("", ".txt", ".lst", ".list")  # a list of paths, by name: what a pattern's matches may be


def _list_name(path: str) -> bool:
    """Whether a pattern's match of the ``lines`` kind is named as a list of paths would be (or is compressed)."""
    name = path.rsplit("/", 1)[-1].lower()
    return bool(compression(name)) or os.path.splitext(name)[1] in LIST_EXTENSIONS


def glob_root(pattern: str) -> str:
    """The folder a pattern's matches are under: its part before the first one holding a wildcard."""
    head, parts = "", pattern.split("/")
    for i, part in enumerate(parts):
        if is_glob(part):
            head = "/".join(parts[:i])
            break
    return head


def _base_dir(source: str) -> str:
    return source.rsplit("/", 1)[0] if is_uri(source) else os.path.dirname(os.path.abspath(source))


def expand_glob(pattern: str) -> list[str]:
    """The files matching ``pattern`` (wildcards in its last part only, for a URI), sorted."""
    if not is_uri(pattern):
        # ``**`` is any depth of folders, as in bash's globstar (one a pattern: a deep tree's are listed at once)
        return sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    head, _, name = pattern.rpartition("/")
    if is_glob(head):
        raise ManifestError(pattern, 0, "on object storage, only the last part of a pattern may hold wildcards")
    scheme = head.split("://", 1)[0]
    fs, p = filesystem(head)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(f"{scheme}://{i.path}" for i in infos
                  if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, name))


def text_lines(source: str) -> Iterator[str]:
    """The lines of the text file ``source`` (a path or URI), each with its line ending.

    Each line is decoded on its own, so that bytes that are not UTF-8 are reported on their own line (a text
    stream decodes 8 KB ahead and blames an earlier one). A byte-order mark opening the file is not content
    (Excel's "CSV UTF-8", PowerShell 5's UTF8). Raises :class:`ManifestError` naming the file and the line."""
    try:
        if source == STDIN:  # JSON Lines piped in: `krasr-batch manifest archive/ | jq ... | krasr-batch run - ...`
            fh = os.fdopen(os.dup(sys.stdin.fileno()), "rb")
        else:
            fh = open_input_stream(source) if is_uri(source) else open(os.path.expanduser(source), "rb")
    except OSError as e:
        raise ManifestError(source, 0, f"cannot open it: {e.strerror or e}") from e
    codec = compression(source)
    if codec:
        import pyarrow as pa

        fh = pa.CompressedInputStream(fh, codec)

    def decoded(raw: bytes, lineno: int) -> str:
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(source, lineno, f"not UTF-8 text ({e.reason} at byte {e.start + 1}); save it as "
                                                "UTF-8 (Excel: \"CSV UTF-8\"; iconv -f cp1251 -t utf-8)") from e

    def read() -> bytes:
        try:
            return fh.read(TEXT_CHUNK_BYTES)
        except OSError as e:  # a codec's stream that is not what its name says, a connection lost
            raise ManifestError(source, lineno + 1, f"cannot read it{f' as {codec}' if codec else ''}: {e}") from e

    with fh:
        lineno, tail = 0, []  # tail: the pieces of a line not yet ended (a list: a huge line is not copied over)
        while chunk := read():
            lines = chunk.split(b"\n")
            if len(lines) == 1:
                tail.append(chunk)
                continue
            lines[0] = b"".join([*tail, lines[0]])
            tail = [lines.pop()]
            for raw in lines:
                lineno += 1
                yield decoded(raw + b"\n", lineno)
        last = b"".join(tail)
        if last:
            yield decoded(last, lineno + 1)


TEXT_CHUNK_BYTES = 1 << 16


# ---------------------------------------------------------------- JSON Lines (krasr-batch's and NeMo's)

def read_jsonl(source: str, sniff: bool = False) -> Iterator[Record]:
    """JSON Lines; with ``sniff``, a list of paths instead where the first line that is not blank opens no
    object (``find archive -name '*.wav' > files.txt``, or piped in): each line a ``path`` (see the module)."""
    base = _base_dir(source)  # the current folder for standard input
    paths = None  # not yet known: told by the first line that is not blank
    for lineno, raw in enumerate(text_lines(source), 1):
        line = raw.strip()
        if not line:
            continue
        if paths is None:
            paths = sniff and not line.startswith("{")
        if paths:
            yield Record({"path": line}, source, lineno, "line", base)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(source, lineno, f"not valid JSON: {e.msg} at column {e.colno}") from e
        if not isinstance(obj, dict):
            raise ManifestError(source, lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield Record(obj, source, lineno, "line", base)


# ---------------------------------------------------------------- CSV / TSV

RESERVED_COLUMNS = (*PATH_COLUMNS, "id", "language", "text")


def canonical_columns(names: Sequence[str]) -> list[str]:
    """A table's column names as the manifest reads them: stripped of spaces, and one of ours in any case
    (``Path``, ``TEXT``: a spreadsheet's header) in lower case, unless the table also has it in lower case."""
    stripped = [n.strip() if isinstance(n, str) else n for n in names]
    return [n.lower() if isinstance(n, str) and n.lower() in RESERVED_COLUMNS and n.lower() not in stripped else n
            for n in stripped]


def _missing_path_column(columns: Sequence[str]) -> str:
    return f"no 'path' column (NeMo's 'audio_filepath' also does); columns: {', '.join(columns) or 'none'}"


def _header_delimiter(header: str, delimiter: str) -> str:
    """``delimiter``, unless only another of , ; and tab makes the header name a path column: a .csv that
    Excel saved in a locale whose decimal mark is a comma (Russian, Kazakh, most of Europe) is separated by
    semicolons."""
    for d in (delimiter, *(c for c in (",", ";", "\t") if c != delimiter)):
        fields = canonical_columns(next(csv.reader([header], delimiter=d), []))
        if any(f in PATH_COLUMNS for f in fields):
            return d
    return delimiter


def read_csv(source: str, delimiter: str) -> Iterator[Record]:
    base = _base_dir(source)
    lines = text_lines(source)
    first = next(lines, "")
    # skipinitialspace: "a.wav, hello" (a space after each comma, as people type) is the path a.wav
    reader = csv.DictReader(itertools.chain([first], lines), delimiter=_header_delimiter(first, delimiter),
                            skipinitialspace=True)
    try:
        header = reader.fieldnames
        if not header:
            raise ManifestError(source, 0, "empty: a header line naming the columns comes first")
        if not any(c in canonical_columns(header) for c in PATH_COLUMNS):
            raise ManifestError(source, 1, _missing_path_column(header))
        reader.fieldnames = header = canonical_columns(header)
        for row in reader:
            if None in row:
                raise ManifestError(source, reader.line_num, f"more fields than the header's {len(header)}")
            yield Record({k: v for k, v in row.items() if v not in (None, "")}, source, reader.line_num,
                         "line", base)
    except csv.Error as e:
        raise ManifestError(source, reader.line_num, f"not valid CSV: {e}") from e
    finally:
        lines.close()


# ---------------------------------------------------------------- Parquet: a table, or dataset shards

PARQUET_BATCH_ROWS = 10_000


def read_parquet(source: str, counter: list[int]) -> Iterator[Record]:
    """A Parquet manifest: a table of paths, or a dataset shard (``counter`` numbers rows over all shards)."""
    fs, p = filesystem(source)
    try:
        f = fs.open_input_file(p)
        pf = pq.ParquetFile(f)
    except (OSError, ValueError) as e:  # ArrowInvalid (not Parquet) is a ValueError
        raise ManifestError(source, 0, f"cannot read it as Parquet: {e}") from e
    with f:
        schema = pf.schema_arrow
        audio = schema.get_field_index(AUDIO_COLUMN)
        if audio >= 0 and is_audio_struct(schema.field(audio)):
            yield from _read_shard(source, pf, counter)
            return
        names = canonical_columns(schema.names)
        if not any(c in names for c in PATH_COLUMNS):
            hint = "" if audio < 0 else " ('audio' is not a struct of bytes and path, so this is no dataset shard)"
            raise ManifestError(source, 0, _missing_path_column(schema.names) + hint)
        base, row = _base_dir(source), 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for values in zip(*(c.to_pylist() for c in batch.columns)):
                yield Record({k: v for k, v in zip(names, values) if v is not None}, source, row, "row", base)
                row += 1


def _read_shard(source: str, pf: pq.ParquetFile, counter: list[int]) -> Iterator[Record]:
    """Rows of a dataset shard, without their audio bytes: ``audio.path`` is read, the bytes stay in the file."""
    shard = source if is_uri(source) else os.path.abspath(os.path.expanduser(source))
    names = [n for n in pf.schema_arrow.names if n != AUDIO_COLUMN]
    # two aligned streams of the same row batches: the other columns, and only the path inside the audio struct
    rows = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=names) if names else None
    paths = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[f"{AUDIO_COLUMN}.path"])
    row = 0
    for path_batch in paths:
        audio = path_batch.column(0)  # the struct, holding only its path
        audio_paths = (audio.field("path") if audio.type.num_fields else audio).to_pylist()
        others = next(rows).to_pylist() if rows is not None else [{}] * len(audio_paths)
        for obj, audio_path in zip(others, audio_paths):
            obj = {k: v for k, v in obj.items() if v is not None}
            obj.pop("path", None)  # the audio is the row itself; a column of that name is not its location
            obj.setdefault("id", audio_path or str(counter[0]))
            if audio_path:
                obj.setdefault("audio_path", audio_path)
            obj["path"] = shard_ref(shard, row)
            yield Record(obj, source, row, "row", resolved=True)
            row += 1
            counter[0] += 1


# ---------------------------------------------------------------- one media file, or a pattern's

def read_media_file(source: str, counter: list[int], root: str | None = None,
                    pattern: str | None = None) -> Iterator[Record]:
    """One audio or video file as an entry: its id its name (its path from ``root``, the folder of the
    ``pattern`` that matched it), its sidecar ``NAME.txt`` its text, as a folder walk gives them."""
    counter[0] += 1
    if is_uri(source):
        sidecar = os.path.splitext(source)[0] + SIDECAR_EXTENSION
        fs, key = filesystem(sidecar)
        try:
            found = fs.get_file_info(filesystem(source)[1]).type != pafs.FileType.NotFound
            has_sidecar = fs.get_file_info(key).type == pafs.FileType.File
        except OSError as e:
            raise ManifestError(source, 0, f"cannot look for it: {e}") from e
        if not found:
            raise ManifestError(source, 0, "no such file")
        text, warning = _read_sidecar(fs, key, sidecar) if has_sidecar else (None, None)
        path = source
    else:
        path = os.path.abspath(source)
        if not os.path.lexists(path):  # a name mistyped on the command line (a pattern's matches exist)
            raise ManifestError(printable_path(source), 0, "no such file")
        sidecar = os.path.splitext(path)[0] + SIDECAR_EXTENSION
        text, warning = (_read_sidecar(None, sidecar, printable_path(sidecar)) if os.path.isfile(sidecar)
                         else (None, None))
    if root is None:
        rel = source.rsplit("/", 1)[-1]
    elif is_uri(source):
        rel = source[len(root):].lstrip("/")
    else:
        rel = os.path.relpath(path, os.path.abspath(root or "."))
    obj: dict[str, Any] = {"id": printable_path(rel), "path": path if is_uri(path) else printable_path(path)}
    if text is not None:
        obj["text"] = text
    yield Record(obj, pattern or source, counter[0], "entry", resolved=True, warning=warning)


# ---------------------------------------------------------------- a folder or prefix

def _matches(rel: str, globs: Sequence[str]) -> bool:
    return not globs or any(fnmatch.fnmatchcase(rel, g) for g in globs)


def _read_sidecar(fs: pafs.FileSystem | None, path: str, shown: str) -> tuple[str | None, str | None]:
    """The text beside a media file, and None; or None and a ``sidecar`` warning where it is not UTF-8 (a
    reference text saved in cp1251 or KZ-1048 does not stop a job over a whole archive: the file is still
    transcribed, and the warning names the text). ``fs`` None reads a local file with Python's own ``open``,
    which takes a name whose bytes are not UTF-8 (pyarrow's local filesystem does not). A text that cannot be
    read at all (permissions, a network error) is a ManifestError: the run can be made again once it can."""
    try:
        with fs.open_input_stream(path) if fs is not None else open(path, "rb") as f:
            return f.read().decode("utf-8-sig").strip(), None  # Notepad's byte-order mark is not text
    except UnicodeDecodeError as e:
        return None, (f"sidecar: {shown} is not UTF-8 ({e.reason} at byte {e.start + 1}), so the file has no "
                      "reference text (save it as UTF-8: iconv -f cp1251 -t utf-8)")
    except OSError as e:
        raise ManifestError(shown, 0, f"cannot read the sidecar text: {e}") from e


def walk_folder(root: str, globs: Sequence[str] = ()) -> Iterator[Record]:
    """The media files under ``root``, each folder's entries in name order, depth first (see the module)."""
    fs, base = filesystem(root)
    base = base.rstrip("/") or "/"
    prefix = root.split("://", 1)[0] + "://" if is_uri(root) else ""
    seen_dirs: set[str] = set()
    position = [0]

    def full(path: str) -> str:
        return prefix + path

    def level(directory: str) -> Iterator[Record]:
        if not prefix:  # a symlinked folder loop on a local disk is walked once
            real = os.path.realpath(directory)
            if real in seen_dirs:
                return
            seen_dirs.add(real)
        try:
            if prefix:
                entries = [(i.base_name, i.path, i.type == pafs.FileType.Directory, i.type == pafs.FileType.File)
                           for i in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))]
            else:  # os.scandir: pyarrow's listing leaves out dangling links, and fails on a name not in UTF-8
                entries = _local_entries(directory)
        except OSError as e:
            raise ManifestError(full(printable_path(directory)), 0, f"cannot list this folder: {e}") from e
        entries.sort(key=lambda e: e[0])
        names = {name for name, _, _, regular in entries if regular}
        media = []
        for name, path, is_dir, _ in entries:
            if name.startswith("."):
                continue
            if is_dir:
                yield from _flush(media)
                media = []
                yield from level(path)
                continue
            stem, ext = os.path.splitext(name)
            if ext.lower() not in MEDIA_EXTENSIONS:
                continue
            text = path if prefix else printable_path(path)
            rel = text[len(base):].lstrip("/")
            if not _matches(rel, globs):
                continue
            sidecar = stem + SIDECAR_EXTENSION
            media.append((text, rel, f"{directory.rstrip('/')}/{sidecar}" if sidecar in names else None))
        yield from _flush(media)

    def _flush(media: list[tuple[str, str, str | None]]) -> Iterator[Record]:
        if not media:
            return
        sidecars = [s for _, _, s in media if s]
        if prefix:
            read = lambda s: _read_sidecar(fs, s, full(s))  # noqa: E731
        else:  # Python's open: a local name may hold bytes that are not UTF-8
            read = lambda s: _read_sidecar(None, s, printable_path(s))  # noqa: E731
        if prefix and len(sidecars) > 1:  # object storage: one request each, so several at once
            with ThreadPoolExecutor(SIDECAR_READERS) as ex:
                texts = dict(zip(sidecars, ex.map(read, sidecars)))
        else:
            texts = {s: read(s) for s in sidecars}
        for path, rel, sidecar in media:
            position[0] += 1
            obj: dict[str, Any] = {"id": rel, "path": full(path)}
            text, warning = texts[sidecar] if sidecar else (None, None)
            if text is not None:
                obj["text"] = text
            yield Record(obj, root, position[0], "entry", resolved=True, warning=warning)

    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory and not prefix:
        raise ManifestError(root, 0, "not a folder")
    yield from level(base)
