"""The driver's side of the stream: assembling finished files, the run's counts and the progress line.

:class:`Assembler` collects the stage rows (:data:`krasr_batch.schema.STAGE_SCHEMA`) as they come back in
any order and hands over a file only once all its segments are in, its segments in order and its text
joined from theirs; that is what makes a committed file whole. Nothing here needs Ray.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from krasr_batch.engines.base import segment_token_limit
from krasr_batch.manifest import ManifestSummary, convert_extra
from krasr_batch.output.layout import failures_by_kind, warnings_by_kind
from krasr_batch.pipeline.errors import RunAborted
from krasr_batch.schema import FILE_ROW, decoded_whole, file_row, language_seconds, segment_row, word_rows


@dataclass
class RunStats:
    total_files: int = 0
    skipped_files: int = 0  # done by an earlier run
    retried_files: int = 0  # failed in an earlier run, done again (--retry-failed)
    files_done: int = 0  # decoded and assembled in this run
    files_committed: int = 0  # of those, written to files/
    files_ok: int = 0
    files_failed: int = 0
    failures_by_kind: dict[str, list[str]] = field(default_factory=dict)
    warnings_by_kind: dict[str, list[str]] = field(default_factory=dict)  # files of this run with a warning
    audio_s: float = 0.0
    speech_s: float = 0.0
    segments: int = 0
    truncated_segments: int = 0
    truncated_by_cause: dict[str, int] = field(default_factory=dict)  # quality.TRUNCATION_CAUSES
    # files decoded whole whose card limit cut their text short, decoded on to the "fit" budget (Decoder.decode)
    clips_past_card_limit: int = 0
    suspect_segments: int = 0
    decode_s: float = 0.0
    model_s: float = 0.0  # seconds replicas spent in model calls: each segment's share of its batch's call
    segment_s: float = 0.0  # seconds the decode-and-segment tasks spent (audio decoding, resampling, VAD, cutting)
    wall_s: float = 0.0
    # seconds from the run's start to each step: model_checked, ray_ready, first_result, last_result, written
    timeline: dict[str, float] = field(default_factory=dict)
    replicas: int = 0  # model replicas the run started
    passes: int = 0  # Ray Data executions the run went through (one per --pass-files files)
    passes_planned: int = 0  # the passes this run's files make
    # the whole output, earlier runs included (what the exit status and the summary's failures describe)
    output_ok: int = 0
    output_failed: int = 0
    output_failures_by_kind: dict[str, list[str]] = field(default_factory=dict)
    output_other: int = 0  # committed files that are not in this run's manifest (an earlier run's, another manifest)

    @property
    def rtfx(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


PROGRESS_EVERY_TTY_S = 2.0  # a terminal's line is rewritten in place
PROGRESS_EVERY_LOG_S = 30.0  # off a terminal (a job log) each line stays: 2,880 a day rather than 43,200


class Progress:
    """One status line: files, audio hours, RTFx (audio seconds per wall second) and an ETA.

    On a terminal the line is rewritten every ``PROGRESS_EVERY_TTY_S``; elsewhere (a scheduler's log, a pipe) a
    new line is written every ``PROGRESS_EVERY_LOG_S``, and at once when a notice (e.g. a stall) comes or goes
    or the next pass starts. ``every_s`` sets the interval for both.
    """

    def __init__(self, stats: RunStats, enabled: bool, stream=None, every_s: float | None = None):
        self.stats, self.enabled, self.stream = stats, enabled, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if every_s is not None else PROGRESS_EVERY_TTY_S if self.tty else PROGRESS_EVERY_LOG_S
        self.t0 = time.perf_counter()
        self.last = float("-inf")
        self.notice: str | None = None  # e.g. what Ray cannot place, shown after the counts
        self._shown = (False, 0)  # whether the last line written had a notice, and its pass

    def line(self) -> str:
        s = self.stats
        wall = time.perf_counter() - self.t0
        todo = s.total_files - s.skipped_files
        rate = s.files_done / wall if wall > 0 else 0.0
        eta = (todo - s.files_done) / rate if rate > 0 else float("nan")
        eta_txt = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "--:--:--"
        return (f"files {s.files_done + s.skipped_files}/{s.total_files} ({s.files_failed} failed, "
                f"{s.files_committed + s.skipped_files} committed)  "
                f"audio {s.audio_s / 3600:.2f} h  segments {s.segments}  "
                f"RTFx {s.audio_s / wall if wall > 0 else 0:.1f}  elapsed {time.strftime('%H:%M:%S', time.gmtime(wall))}  ETA {eta_txt}"
                + (f"  pass {s.passes}/{s.passes_planned}" if s.passes_planned > 1 else "")
                + (f"  {self.notice}" if self.notice else ""))

    def update(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        state = (self.notice is not None, self.stats.passes)  # a notice's wording (its clock) is no news
        if force or now - self.last >= self.every_s or (state != self._shown and not self.tty):
            self.last, self._shown = now, state
            if self.tty:
                self.stream.write("\r\033[K" + self.line())
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            if self.tty:
                self.stream.write("\n")


def past_card_limit(num_segments: int, seg: dict, duration_s: float | None) -> bool:
    """A file decoded whole (its one segment ``seg``, a segment row, spans it) that its card limit cut short
    and that went on (``Decoder._going_on``): its limit is the "fit" budget of its length, above the card's.
    No policy gives a whole file that limit otherwise (the card's table, or with "none" the model's 448, above
    any budget of up to 30 s), so the rows tell it without the run's settings. The run's summary and
    ``inspect`` count these."""
    if not decoded_whole(num_segments, seg["start_s"], seg["end_s"], duration_s):
        return False
    limit, audio_s = seg["max_new_tokens"], seg["audio_s"]
    return limit is not None and audio_s is not None \
        and limit == segment_token_limit(audio_s, False, "fit") > segment_token_limit(audio_s, True, "fit")


class Assembler:
    """Collects segment and file rows as they stream back; hands over files whose segments are all in."""

    def __init__(self, summary: ManifestSummary, stats: RunStats, decoded: bool = True):
        self.summary = summary
        self.decoded = decoded  # False for ``plan``: files get no text (None), as nothing was decoded
        self.stats = stats
        self.segments: dict[str, list[dict]] = {}
        self.words: dict[str, list[dict]] = {}
        self.file_rows: dict[str, dict] = {}
        self.ready_segments: list[dict] = []
        self.ready_files: list[dict] = []
        self.ready_words: list[dict] = []

    def add(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            fid = row["file_id"]
            if row["segment_index"] != FILE_ROW:
                self.segments.setdefault(fid, []).append(segment_row(row))
                if row.get("words"):
                    self.words.setdefault(fid, []).extend(word_rows(row))
            else:
                self.file_rows[fid] = row
            self._maybe_complete(fid)

    def _maybe_complete(self, fid: str) -> None:
        row = self.file_rows.get(fid)
        if row is None:
            return
        segs = self.segments.get(fid, [])
        if len(segs) < row["num_segments"]:
            return
        self.file_rows.pop(fid)
        self.segments.pop(fid, None)
        words = self.words.pop(fid, [])
        segs.sort(key=lambda r: r["segment_index"])
        words.sort(key=lambda r: (r["segment_index"], r["word_index"]))
        ok = row["status"] == "ok" and self.decoded
        text = " ".join(s["text"] for s in segs if s["text"]) if ok else None
        out = file_row(row, text, len(segs), language_seconds(segs) if ok else None)
        extra = json.loads(row["extra_json"]) if row["extra_json"] else {}
        for k, t in self.summary.extra_types.items():
            out[k] = convert_extra(extra.get(k), t)
        self.ready_segments.extend(segs)
        self.ready_words.extend(words)
        self.ready_files.append(out)
        self._count(row, segs)

    def _count(self, row: dict, segs: list[dict]) -> None:
        st = self.stats
        st.files_done += 1
        if row["status"] == "ok":
            st.files_ok += 1
            st.audio_s += row["duration_s"] or 0.0
            st.speech_s += row["speech_s"] or 0.0
            warnings_by_kind([row], into=st.warnings_by_kind)
        else:
            st.files_failed += 1
            failures_by_kind([row], into=st.failures_by_kind)
        st.segments += len(segs)
        st.truncated_segments += sum(1 for s in segs if s["truncated"])
        for s in segs:
            if s["truncation"]:
                st.truncated_by_cause[s["truncation"]] = st.truncated_by_cause.get(s["truncation"], 0) + 1
        if self.decoded and segs and past_card_limit(len(segs), segs[0], row["duration_s"]):
            st.clips_past_card_limit += 1
        st.suspect_segments += sum(1 for s in segs if s["suspect"])
        st.decode_s += sum(s["decode_s"] or 0.0 for s in segs)
        st.model_s += sum((s["decode_s"] or 0.0) / max(s["batch_size"] or 1, 1) for s in segs)
        st.segment_s += row["segment_wall_s"] or 0.0

    def take(self) -> tuple[list[dict], list[dict], list[dict]]:
        """The finished files' (segment rows, file rows, word rows), handed over once."""
        segs, files, words = self.ready_segments, self.ready_files, self.ready_words
        self.ready_segments, self.ready_files, self.ready_words = [], [], []
        return segs, files, words

    @property
    def pending(self) -> int:
        return len(self.file_rows) + len(self.segments)


def check_failures(stats: RunStats, max_fraction: float, min_files: int) -> None:
    """Raise RunAborted once more than ``max_fraction`` of at least ``min_files`` files failed."""
    if stats.files_done >= min_files and stats.files_failed > max_fraction * stats.files_done:
        kinds = ", ".join(f"{k}: {len(v)}" for k, v in sorted(stats.failures_by_kind.items(), key=lambda kv: -len(kv[1])))
        raise RunAborted(
            f"{stats.files_failed} of the first {stats.files_done} files failed "
            f"(more than --max-failed-fraction {max_fraction:g}); causes: {kinds}. Is a mount or bucket missing? "
            "Finished files are kept; rerun the same command to continue.")

