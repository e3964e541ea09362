"""Every row shape, declared once: the ``segments/`` and ``files/`` tables, and the pipeline's stage rows.

A stage row is what flows from the decode-and-segment tasks through the model actors to the driver: the
file's fields on every row, then the segment's (``segment_index`` -1 marks the one file row of each file,
which carries the file's status and no segment). The ``segments/`` row is the projection of a stage row
onto :data:`SEGMENTS_SCHEMA`; the ``files/`` row takes the stage's file fields, with ``language`` from
``req_language`` (what was asked, not what a segment decoded with), plus the joined text, the seconds by language and the
manifest's extra columns (:func:`files_schema`). With word timestamps a segment's stage row also carries its
words, which become ``words/`` rows (:data:`WORDS_SCHEMA`, :func:`word_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

SEGMENTS_SCHEMA = pa.schema([
    ("file_id", pa.string()),
    ("path", pa.string()),
    ("segment_index", pa.int32()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    # seconds of audio the model decoded: end_s - start_s less the middles of long pauses the window skips
    ("audio_s", pa.float64()),
    ("text", pa.string()),
    ("language", pa.string()),  # the Whisper code of the language decoded with
    ("language_prob", pa.float64()),  # its probability at the detection step (engines.base.SegmentOutput)
    ("max_new_tokens", pa.int32()),
    ("num_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("decode_s", pa.float64()),
    ("batch_size", pa.int32()),
    ("worker", pa.string()),
    ("avg_logprob", pa.float64()),
    ("compression_ratio", pa.float64()),
    ("no_speech_prob", pa.float64()),
    ("suspect", pa.bool_()),
    ("truncation", pa.string()),  # why a truncated segment stopped: "repetition" or "did_not_fit" (quality.py)
])

FILES_BASE_SCHEMA = pa.schema([
    ("file_id", pa.string()),
    ("path", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("error_kind", pa.string()),
    ("warning", pa.string()),
    ("duration_s", pa.float64()),
    ("speech_s", pa.float64()),
    ("num_segments", pa.int32()),
    ("text", pa.string()),
    ("reference_text", pa.string()),
    ("language", pa.string()),  # requested, as its Whisper code ("kk", "ru"; "auto": detected); the stage's req_language
    # seconds of the file's segments (end_s - start_s, those with text) by the language each was decoded in
    ("language_s", pa.map_(pa.string(), pa.float64())),
    ("segment_wall_s", pa.float64()),
])


WORD_FIELDS = [
    ("word", pa.string()),  # as Whisper gives it, with its leading space: a segment's words joined are its text
    ("start_s", pa.float64()),  # in the source file's timeline, as the segment's
    ("end_s", pa.float64()),
    ("probability", pa.float64()),  # mean probability of its tokens
]
WORD_TYPE = pa.struct(WORD_FIELDS)

WORDS_SCHEMA = pa.schema([
    ("file_id", pa.string()),
    ("segment_index", pa.int32()),
    ("word_index", pa.int32()),  # from 0 in each segment
    *WORD_FIELDS,
])
"""``words/`` (with --word-timestamps): one row per word, committed with its file's segments."""


def files_schema(extra_fields: Iterable[pa.Field]) -> pa.Schema:
    """``files/``: the base columns, then the manifest's other fields (``ManifestSummary.extra_schema``)."""
    schema = FILES_BASE_SCHEMA
    for f in extra_fields:
        schema = schema.append(f)
    return schema


# ---------------------------------------------------------------- stage rows

# the file's fields, carried on each of its rows: from the manifest ...
STAGE_FILE_INPUT = pa.schema([
    ("line", pa.int64()), ("req_language", pa.string()), ("reference_text", pa.string()), ("extra_json", pa.string()),
])
# ... and what decoding and segmenting found (set on every row; final on the file row)
STAGE_FILE_RESULT = pa.schema([f for f in FILES_BASE_SCHEMA if f.name in (
    "status", "error", "error_kind", "warning", "duration_s", "speech_s", "num_segments", "segment_wall_s")])
# what the model stage fills in (empty on file rows)
MODEL_OUTPUT_NAMES = ("text", "language", "language_prob", "num_tokens", "truncated", "decode_s", "batch_size",
                      "worker", "avg_logprob", "compression_ratio", "no_speech_prob", "suspect", "truncation", "words")

STAGE_SCHEMA = pa.schema(
    list(SEGMENTS_SCHEMA)[:2] + list(STAGE_FILE_INPUT) + list(STAGE_FILE_RESULT) + list(SEGMENTS_SCHEMA)[2:]
    + [("words", pa.list_(WORD_TYPE))])
"""What the model stage returns and the driver assembles: one row per segment and one file row per file;
``words`` (null without --word-timestamps) holds the segment's words in the source file's timeline."""

FILE_ROW = -1  # segment_index of a file row

# files/ columns that a stage row holds under another name
FILES_FROM_STAGE = {"language": "req_language"}


def decoded_whole(num_segments: int, start_s: float, end_s: float, duration_s: float | None) -> bool:
    """A segment that is its whole file (its only segment, from 0 to the file's duration): the file was decoded
    whole, as the card decodes a clip (``SegmentPlan.whole_file``, told from the rows)."""
    return num_segments == 1 and start_s == 0.0 and abs(end_s - (duration_s or 0.0)) < 1e-6


def segment_row(stage_row: dict) -> dict:
    """A ``segments/`` row from a stage row."""
    return {name: stage_row[name] for name in SEGMENTS_SCHEMA.names}


def word_rows(stage_row: dict) -> list[dict]:
    """The ``words/`` rows of a segment's stage row (none without words)."""
    base = {"file_id": stage_row["file_id"], "segment_index": stage_row["segment_index"]}
    return [{**base, "word_index": i, **w} for i, w in enumerate(stage_row.get("words") or [])]


def language_seconds(segments: Iterable[dict]) -> dict[str, float]:
    """``files/`` ``language_s``: seconds of audio of segments with text (``audio_s``: pauses a window skips do
    not count), by the language each was decoded in."""
    out: dict[str, float] = {}
    for s in segments:
        if s["text"] and s["language"]:
            secs = s["audio_s"] if s.get("audio_s") is not None else s["end_s"] - s["start_s"]
            out[s["language"]] = out.get(s["language"], 0.0) + secs
    return out


def file_row(stage_row: dict, text: str | None, num_segments: int, language_s: dict[str, float] | None = None) -> dict:
    """A ``files/`` row (base columns) from a file's stage row, its joined text, its segment count and its
    seconds by language (:func:`language_seconds`)."""
    row = {name: stage_row[FILES_FROM_STAGE.get(name, name)] for name in FILES_BASE_SCHEMA.names
           if name not in ("text", "num_segments", "language_s")}
    row.update(text=text, num_segments=num_segments, language_s=language_s)
    return {name: row[name] for name in FILES_BASE_SCHEMA.names}
