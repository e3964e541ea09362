"""``krasr-batch export``: one subtitle or text file per transcribed source file.

Formats: ``srt`` (numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``), ``vtt`` (``WEBVTT`` header,
``HH:MM:SS.mmm``), ``txt`` (the segment texts joined by spaces, as ``files/`` ``text``) and ``jsonl`` (one
segment a line: ``file_id``, ``segment_index``, ``start_s``, ``end_s``, ``text``, ``language``,
``truncated``, and ``suspect`` where that column exists).

Only ``ok`` files are exported, every one of them (a file with no speech gets an empty file, a VTT file
just its header). Segments are taken in ``segment_index`` order; empty texts are skipped. Cue times are
clamped to ``[0, duration_s]`` of the file. A file's name comes from its ``file_id`` made safe for any
filesystem (see :func:`safe_names`), so names are unique within one export.

Segments are streamed part by part: a run commits a file's segments in the same part as its files/ row,
so a file is written as soon as all its ``num_segments`` segments have been read, and memory holds
about one part at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from krasr_batch.output.reader import RunOutput
from krasr_batch.storage import filesystem, join

log = logging.getLogger(__name__)

FORMATS = ("srt", "vtt", "txt", "jsonl")
MAX_NAME_CHARS = 120
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".wma", ".webm", ".mp4", ".mkv",
                  ".aiff", ".aif", ".amr", ".3gp")
_UNSAFE = re.compile(r"[^\w.\-]+")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
SEGMENT_COLUMNS = ("file_id", "segment_index", "start_s", "end_s", "text", "language", "truncated", "suspect")


@dataclass(frozen=True)
class Segment:
    """One segment as exported."""

    file_id: str
    segment_index: int
    start_s: float
    end_s: float
    text: str
    language: str | None = None
    truncated: bool | None = None
    suspect: bool | None = None


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and how much it wrote."""

    directory: str
    format: str
    files: int
    cues: int


# ---------------------------------------------------------------- names

def _hash(file_id: str) -> str:
    return hashlib.sha1(file_id.encode("utf-8")).hexdigest()[:8]


def safe_stem(file_id: str) -> str:
    """A file name (no extension) from a file id: scheme dropped, path separators and anything other than
    letters, digits, ``.``, ``-`` and ``_`` turned into ``_``, a trailing audio extension dropped."""
    text = unicodedata.normalize("NFC", file_id)
    text = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", text)
    lowered = text.lower()
    for suffix in AUDIO_SUFFIXES:
        if lowered.endswith(suffix) and len(text) > len(suffix):
            text = text[: -len(suffix)]
            break
    stem = _UNSAFE.sub("_", text).strip("._-")
    if stem.lower() in _WINDOWS_RESERVED:
        stem = f"_{stem}"
    return stem


def safe_names(file_ids: Iterable[str]) -> dict[str, str]:
    """file id -> a unique file name stem, safe on any filesystem (case-insensitive ones included).

    Stems that are empty, too long or shared (ignoring case) by several ids get ``-<sha1 of the id>``
    appended, so the result does not depend on the order of the ids.
    """
    ids = sorted(set(file_ids))
    stems = {fid: safe_stem(fid) for fid in ids}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    names = {}
    for fid, stem in stems.items():
        if not stem or len(stem) > MAX_NAME_CHARS or counts[stem.lower()] > 1:
            stem = f"{stem[:MAX_NAME_CHARS]}-{_hash(fid)}".lstrip("-")
        names[fid] = stem
    return names


# ---------------------------------------------------------------- rendering

def timestamp(seconds: float, sep: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT) or with ``sep="."`` ``HH:MM:SS.mmm`` (WebVTT); hours may exceed 99."""
    ms = max(int(round(seconds * 1000)), 0)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _one_line(text: str) -> str:
    return " ".join(text.split())  # a blank line would end the cue


def _cue_times(seg: Segment, duration_s: float | None) -> tuple[float, float]:
    start, end = max(seg.start_s, 0.0), max(seg.end_s, 0.0)
    if duration_s is not None and math.isfinite(duration_s):
        start, end = min(start, duration_s), min(end, duration_s)
    return start, max(end, start)


def render_srt(segments: list[Segment], duration_s: float | None = None) -> str:
    """SubRip: numbered cues from 1."""
    blocks = []
    for n, seg in enumerate(segments, 1):
        start, end = _cue_times(seg, duration_s)
        blocks.append(f"{n}\n{timestamp(start)} --> {timestamp(end)}\n{_one_line(seg.text)}\n")
    return "\n".join(blocks)


def _vtt_text(text: str) -> str:
    text = _one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def render_vtt(segments: list[Segment], duration_s: float | None = None) -> str:
    """WebVTT: the header, then one cue a segment (text escaped for ``&``, ``<``, ``>``)."""
    blocks = ["WEBVTT\n"]
    for seg in segments:
        start, end = _cue_times(seg, duration_s)
        blocks.append(f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{_vtt_text(seg.text)}\n")
    return "\n".join(blocks)


def render_txt(segments: list[Segment], duration_s: float | None = None) -> str:
    """The transcript: segment texts joined by spaces, one line."""
    text = " ".join(seg.text.strip() for seg in segments)
    return text + "\n" if text else ""


def render_jsonl(segments: list[Segment], duration_s: float | None = None) -> str:
    """One JSON object a segment."""
    lines = []
    for seg in segments:
        row = {"file_id": seg.file_id, "segment_index": seg.segment_index, "start_s": seg.start_s,
               "end_s": seg.end_s, "text": seg.text, "language": seg.language, "truncated": seg.truncated}
        if seg.suspect is not None:
            row["suspect"] = seg.suspect
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return "".join(lines)


RENDERERS = {"srt": render_srt, "vtt": render_vtt, "txt": render_txt, "jsonl": render_jsonl}


def render(fmt: str, segments: Iterable[Segment], duration_s: float | None = None) -> str:
    """One file's output: non-empty segments in ``segment_index`` order."""
    kept = sorted((s for s in segments if s.text and s.text.strip()), key=lambda s: s.segment_index)
    return RENDERERS[fmt](kept, duration_s)


# ---------------------------------------------------------------- a run

@dataclass(frozen=True)
class _Target:
    name: str
    duration_s: float | None
    num_segments: int


class _Writer:
    """Writes each file's output once all its segments are in."""

    def __init__(self, fmt: str, directory: str, targets: dict[str, _Target]):
        self.fmt, self.directory, self.targets = fmt, directory, targets
        self.fs, root = filesystem(directory)
        self.fs.create_dir(root, recursive=True)
        self.pending: dict[str, list[Segment]] = {}
        self.written: set[str] = set()
        self.cues = 0

    def add(self, seg: Segment) -> None:
        target = self.targets.get(seg.file_id)
        if target is None or seg.file_id in self.written:
            return  # a failed file (they have no segments), one without a files/ row, or a duplicate
        segs = self.pending.setdefault(seg.file_id, [])
        segs.append(seg)
        if len(segs) >= target.num_segments:
            self.write(seg.file_id)

    def write(self, file_id: str) -> None:
        target = self.targets[file_id]
        kept = [s for s in self.pending.pop(file_id, []) if s.text and s.text.strip()]
        _, path = filesystem(join(self.directory, f"{target.name}.{self.fmt}"))
        with self.fs.open_output_stream(path) as f:
            f.write(render(self.fmt, kept, target.duration_s).encode("utf-8"))
        self.written.add(file_id)
        self.cues += len(kept)

    def finish(self) -> None:
        """Write the files whose segment count never reached ``num_segments``, and those without segments."""
        for file_id in list(self.pending):
            log.warning("%s: found %d segments, files/ says %d", file_id, len(self.pending[file_id]),
                        self.targets[file_id].num_segments)
            self.write(file_id)
        for file_id in sorted(self.targets.keys() - self.written):
            self.write(file_id)


def _targets(output: RunOutput) -> dict[str, _Target]:
    rows = output.files_table(["file_id", "status", "duration_s", "num_segments"]).to_pylist()
    ok = [r for r in rows if r.get("status") == "ok"]
    names = safe_names(r["file_id"] for r in ok)
    return {r["file_id"]: _Target(names[r["file_id"]], r.get("duration_s"), r.get("num_segments") or 0) for r in ok}


def _segments(batch) -> Iterable[Segment]:
    cols = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
    n = batch.num_rows
    get = lambda name: cols.get(name) or [None] * n
    fids, idx, starts, ends, texts = get("file_id"), get("segment_index"), get("start_s"), get("end_s"), get("text")
    langs, trunc, susp = get("language"), get("truncated"), get("suspect")
    for i in range(n):
        yield Segment(fids[i], idx[i] if idx[i] is not None else i, starts[i] or 0.0, ends[i] or 0.0,
                      texts[i] or "", langs[i], trunc[i], susp[i])


def export(output: RunOutput, fmt: str, to: str | None = None) -> ExportResult:
    """Write one ``<name>.<fmt>`` per ok file under ``to`` (default ``OUT_DIR/export/<fmt>/``)."""
    if fmt not in RENDERERS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    directory = to or join(output.out, "export", fmt)
    writer = _Writer(fmt, directory, _targets(output))
    for batch in output.segment_batches(SEGMENT_COLUMNS):
        for seg in _segments(batch):
            writer.add(seg)
    writer.finish()
    log.info("exported %d files (%d cues) to %s", len(writer.written), writer.cues, directory)
    return ExportResult(directory, fmt, len(writer.written), writer.cues)
