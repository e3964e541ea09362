"""``krasr-batch export``: one subtitle or text file per transcribed source file.

Formats: ``srt`` (numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``), ``vtt`` (``WEBVTT`` header,
``HH:MM:SS.mmm``), ``txt`` (the segment texts joined by spaces, as ``files/`` ``text``) and ``jsonl`` (one
segment a line: ``file_id``, ``segment_index``, ``start_s``, ``end_s``, ``text``, ``language``,
``truncated``, and ``suspect``, ``language_prob`` and ``words`` where the run has them).

Subtitle cues: a segment with word times (a run with ``--word-timestamps``) is cut into cues at common
subtitle limits (:data:`MAX_LINE_CHARS` characters a line, :data:`MAX_CUE_LINES` lines, :data:`MAX_CUE_S`
seconds a cue), each cue timed by its first and last word; a segment without words is one cue.

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
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, replace

from krasr_batch.inputs import MEDIA_EXTENSIONS
from krasr_batch.output.reader import RunOutput
from krasr_batch.storage import filesystem, join

log = logging.getLogger(__name__)

FORMATS = ("srt", "vtt", "txt", "jsonl")
MAX_NAME_CHARS = 120
_UNSAFE = re.compile(r"[^\w.\-]+")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
SEGMENT_COLUMNS = ("file_id", "segment_index", "start_s", "end_s", "text", "language", "truncated", "suspect",
                   "language_prob")
# common subtitle limits (e.g. the BBC's and Netflix's guidelines: about 42 characters a line, two lines, 7 s)
MAX_LINE_CHARS = 42
MAX_CUE_LINES = 2
MAX_CUE_S = 7.0


@dataclass(frozen=True)
class Word:
    """One word of a segment as ``words/`` holds it (``word`` with Whisper's leading space)."""

    word: str
    start_s: float
    end_s: float
    probability: float | None = None


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
    language_prob: float | None = None
    words: tuple[Word, ...] | None = None  # None: the run has no word times


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
    letters, digits, ``.``, ``-`` and ``_`` turned into ``_``, a trailing audio or video extension (:data:`~krasr_batch.inputs.MEDIA_EXTENSIONS`) dropped."""
    text = unicodedata.normalize("NFC", file_id)
    text = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", text)
    lowered = text.lower()
    suffix = os.path.splitext(lowered)[1]
    if suffix in MEDIA_EXTENSIONS and len(text) > len(suffix):
        text = text[: -len(suffix)]
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


def word_cues(words: Iterable[Word], max_line_chars: int = MAX_LINE_CHARS, max_lines: int = MAX_CUE_LINES,
              max_cue_s: float = MAX_CUE_S) -> list[tuple[float, float, list[str]]]:
    """Words into subtitle cues ``(start_s, end_s, lines)``: words fill a line up to ``max_line_chars``, a cue
    up to ``max_lines`` lines and ``max_cue_s`` seconds (first word's start to last word's end). Only a single
    word longer than a line, or lasting longer than a cue, exceeds them (it gets a cue of its own)."""
    cues: list[tuple[float, float, list[str]]] = []
    lines: list[list[str]] = []
    start = end = 0.0
    for w in words:
        text = _one_line(w.word)
        if not text:
            continue
        if lines:
            in_time = w.end_s - start <= max_cue_s
            if in_time and len(" ".join([*lines[-1], text])) <= max_line_chars:
                lines[-1].append(text)
                end = w.end_s
                continue
            if in_time and len(lines) < max_lines:
                lines.append([text])
                end = w.end_s
                continue
            cues.append((start, end, [" ".join(line) for line in lines]))
        lines, start, end = [[text]], w.start_s, w.end_s
    if lines:
        cues.append((start, end, [" ".join(line) for line in lines]))
    return cues


def _cues(seg: Segment, duration_s: float | None) -> list[tuple[float, float, list[str]]]:
    """A segment's cues: from its words when it has them, else the whole segment on one line; times clamped
    to ``[0, duration_s]``."""
    if seg.words:
        cues = word_cues(seg.words)
    else:
        cues = [(seg.start_s, seg.end_s, [_one_line(seg.text)])]
    out = []
    for start, end, lines in cues:
        start, end = _cue_times(replace(seg, start_s=start, end_s=end), duration_s)
        out.append((start, end, lines))
    return out


def render_srt(segments: list[Segment], duration_s: float | None = None) -> str:
    """SubRip: numbered cues from 1."""
    blocks = []
    cues = [c for seg in segments for c in _cues(seg, duration_s)]
    for n, (start, end, lines) in enumerate(cues, 1):
        text = "\n".join(lines)
        blocks.append(f"{n}\n{timestamp(start)} --> {timestamp(end)}\n{text}\n")
    return "\n".join(blocks)


def _vtt_text(text: str) -> str:
    text = _one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def render_vtt(segments: list[Segment], duration_s: float | None = None) -> str:
    """WebVTT: the header, then one cue a segment (text escaped for ``&``, ``<``, ``>``)."""
    blocks = ["WEBVTT\n"]
    for seg in segments:
        for start, end, lines in _cues(seg, duration_s):
            text = "\n".join(_vtt_text(line) for line in lines)
            blocks.append(f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n")
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
        if seg.language_prob is not None:
            row["language_prob"] = seg.language_prob
        if seg.words is not None:
            row["words"] = [{"word": w.word, "start_s": w.start_s, "end_s": w.end_s, "probability": w.probability}
                            for w in seg.words]
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
        self.cues += sum(len(_cues(s, target.duration_s)) for s in kept) if self.fmt in ("srt", "vtt") else len(kept)

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


def _segments(batch, words: dict[tuple[str, int], list[dict]] | None = None, has_words: bool = False) -> Iterable[Segment]:
    """Segments of a batch; ``words``: the words of its part by (file_id, segment_index), and ``has_words``:
    the run timed words (a segment with none then gets an empty tuple)."""
    cols = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
    n = batch.num_rows
    get = lambda name: cols.get(name) or [None] * n
    fids, idx, starts, ends, texts = get("file_id"), get("segment_index"), get("start_s"), get("end_s"), get("text")
    langs, trunc, susp, lprob = get("language"), get("truncated"), get("suspect"), get("language_prob")
    for i in range(n):
        index = idx[i] if idx[i] is not None else i
        seg_words = None
        if has_words:
            seg_words = tuple(Word(w["word"], w["start_s"], w["end_s"], w["probability"])
                              for w in (words or {}).get((fids[i], index), []))
        yield Segment(fids[i], index, starts[i] or 0.0, ends[i] or 0.0, texts[i] or "", langs[i], trunc[i], susp[i],
                      lprob[i], seg_words)


def export(output: RunOutput, fmt: str, to: str | None = None) -> ExportResult:
    """Write one ``<name>.<fmt>`` per ok file under ``to`` (default ``OUT_DIR/export/<fmt>/``)."""
    if fmt not in RENDERERS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    directory = to or join(output.out, "export", fmt)
    writer = _Writer(fmt, directory, _targets(output))
    if output.words_parts:  # part by part, each with the words committed beside it
        for part, table in output.segment_parts(SEGMENT_COLUMNS):
            for seg in _segments(table, output.words_of_part(part), has_words=True):
                writer.add(seg)
    else:
        for batch in output.segment_batches(SEGMENT_COLUMNS):
            for seg in _segments(batch):
                writer.add(seg)
    writer.finish()
    log.info("exported %d files (%d cues) to %s", len(writer.written), writer.cues, directory)
    return ExportResult(directory, fmt, len(writer.written), writer.cues)
