"""``krasr-batch inspect``: what a run produced, read through :mod:`krasr_batch.output.reader`.

:func:`inspect_run` summarises a run: files ok and failed (failures by ``error_kind`` with examples),
audio and speech hours, segments (truncated, suspect), RTFx and settings from ``run.json``, and
per-worker throughput from ``segments/`` (``worker``, ``decode_s``, ``end_s - start_s``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from krasr_batch.output.layout import failures_by_kind
from krasr_batch.output.reader import SUSPECT_INPUTS, RunOutput, column, suspect_flags
from krasr_batch.pipeline.assemble import past_card_limit
from krasr_batch.quality import truncation_cause

EXAMPLES_PER_KIND = 3


# ---------------------------------------------------------------- inspect

@dataclass(frozen=True)
class FailureGroup:
    """Failed files of one ``error_kind``: how many, and a few examples (file id, error message)."""

    kind: str
    count: int
    examples: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class WorkerStats:
    """What one model replica decoded: segments, their audio seconds, and its model-call time.

    ``decode_s`` is each model call's wall time counted once (each segment carries its call's time and
    the call's batch size, so the sum of ``decode_s / batch_size`` over the segments).
    """

    worker: str
    segments: int
    audio_s: float
    decode_s: float

    @property
    def audio_per_decode_s(self) -> float | None:
        return self.audio_s / self.decode_s if self.decode_s > 0 else None


@dataclass(frozen=True)
class InspectReport:
    """What a run produced (see :func:`inspect_run`)."""

    out: str
    complete: bool
    files: int
    files_ok: int
    files_failed: int
    files_with_warning: int
    failures: tuple[FailureGroup, ...]
    audio_s: float
    speech_s: float
    segments: int
    truncated_segments: int
    truncated_by_cause: dict[str, int]  # quality.TRUNCATION_CAUSES: "repetition", "did_not_fit"
    clips_past_card_limit: int  # files decoded whole that went on past the card's limit (the run's summary's count)
    suspect_segments: int
    suspect_files: int
    suspect_source: str  # "column", "computed" or "column+computed"
    workers: tuple[WorkerStats, ...]
    run: dict[str, Any] = field(default_factory=dict)  # run.json ({} when missing)

    @property
    def rtfx(self) -> float | None:
        return self.run.get("rtfx")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the shape of ``inspect --format json``)."""
        d = asdict(self)
        d["audio_h"] = self.audio_s / 3600
        d["speech_h"] = self.speech_s / 3600
        d["rtfx"] = self.rtfx
        d["failures"] = [{"kind": f.kind, "count": f.count,
                          "examples": [{"file_id": fid, "error": err} for fid, err in f.examples]}
                         for f in self.failures]
        d["workers"] = [{**asdict(w), "audio_per_decode_s": w.audio_per_decode_s} for w in self.workers]
        d["settings"] = self.run.get("settings")
        d["model"] = self.run.get("model")
        d["wall_s"] = self.run.get("wall_s")
        d["run_json"] = bool(self.run)
        del d["run"]
        return d


def _failure_groups(rows: list[dict]) -> tuple[FailureGroup, ...]:
    by_kind = failures_by_kind(rows, value=lambda r: r)
    groups = [FailureGroup(kind, len(rs), tuple((r["file_id"], r.get("error")) for r in rs[:EXAMPLES_PER_KIND]))
              for kind, rs in by_kind.items()]
    return tuple(sorted(groups, key=lambda g: (-g.count, g.kind)))


@dataclass
class _SegmentTally:
    # the ok files with one segment (file id -> duration): the clips that went on past the card's limit are
    # told from their one segment (assemble.past_card_limit)
    single: dict = field(default_factory=dict)
    segments: int = 0
    truncated: int = 0
    truncated_by_cause: dict = field(default_factory=dict)
    past_card_limit: int = 0
    suspect: int = 0
    suspect_files: set = field(default_factory=set)
    sources: set = field(default_factory=set)
    workers: dict = field(default_factory=dict)  # worker -> [segments, audio_s, decode_s]

    def add(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        self.segments += n
        fids = column(batch, "file_id") or [None] * n
        truncated = column(batch, "truncated") or [False] * n
        self.truncated += sum(1 for t in truncated if t)
        causes = column(batch, "truncation") or [None] * n  # runs made before the column: told from the text
        texts = column(batch, "text") or [None] * n
        for t, cause, text in zip(truncated, causes, texts):
            cause = cause or truncation_cause(text, bool(t))
            if cause:
                self.truncated_by_cause[cause] = self.truncated_by_cause.get(cause, 0) + 1
        given = column(batch, "suspect")
        if given is None or None in given:
            self.sources.add("computed")
        if given is not None and any(g is not None for g in given):
            self.sources.add("column")
        for fid, bad in zip(fids, suspect_flags(batch)):
            if bad:
                self.suspect += 1
                self.suspect_files.add(fid)
        self._add_past_card_limit(batch, fids, n)
        self._add_workers(batch, n)

    def _add_past_card_limit(self, batch: pa.RecordBatch, fids: list, n: int) -> None:
        if not self.single:
            return
        cols = {name: column(batch, name) or [None] * n for name in ("start_s", "end_s", "max_new_tokens", "audio_s")}
        for i, fid in enumerate(fids):
            if fid in self.single:
                seg = {name: values[i] for name, values in cols.items()}
                self.past_card_limit += past_card_limit(1, seg, self.single[fid])

    def _add_workers(self, batch: pa.RecordBatch, n: int) -> None:
        workers = column(batch, "worker") or [None] * n
        starts = column(batch, "start_s") or [0.0] * n
        ends = column(batch, "end_s") or [0.0] * n
        decode = column(batch, "decode_s") or [0.0] * n
        sizes = column(batch, "batch_size") or [1] * n
        for i in range(n):
            w = self.workers.setdefault(workers[i] or "(unknown)", [0, 0.0, 0.0])
            w[0] += 1
            w[1] += max((ends[i] or 0.0) - (starts[i] or 0.0), 0.0)
            w[2] += (decode[i] or 0.0) / max(sizes[i] or 1, 1)


def _tally_segments(output: RunOutput, single: dict[str, float]) -> _SegmentTally:
    tally = _SegmentTally(single)
    cols = ["file_id", "text", "start_s", "end_s", "audio_s", "max_new_tokens", "truncated", "truncation", "decode_s",
            "batch_size", "worker", *SUSPECT_INPUTS]
    for batch in output.segment_batches(cols):
        tally.add(batch)
    return tally


def inspect_run(output: RunOutput) -> InspectReport:
    """Summarise a run's output folder."""
    files = output.files_table(["file_id", "status", "error", "error_kind", "warning", "duration_s", "speech_s",
                                "num_segments"])
    rows = files.to_pylist()
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    tally = _tally_segments(output, {r["file_id"]: r.get("duration_s") for r in ok if r.get("num_segments") == 1})
    workers = tuple(sorted((WorkerStats(w, v[0], v[1], v[2]) for w, v in tally.workers.items()),
                           key=lambda w: w.worker))
    return InspectReport(
        out=output.out, complete=output.complete, files=len(rows), files_ok=len(ok), files_failed=len(failed),
        files_with_warning=sum(1 for r in rows if r.get("warning")), failures=_failure_groups(failed),
        audio_s=sum(r.get("duration_s") or 0.0 for r in ok), speech_s=sum(r.get("speech_s") or 0.0 for r in ok),
        segments=tally.segments, truncated_segments=tally.truncated, truncated_by_cause=tally.truncated_by_cause,
        clips_past_card_limit=tally.past_card_limit, suspect_segments=tally.suspect,
        suspect_files=len(tally.suspect_files), suspect_source="+".join(sorted(tally.sources)) or "computed",
        workers=workers, run=output.run_info() or {},
    )


# ---------------------------------------------------------------- text rendering

def _settings_lines(settings: dict[str, Any], indent: str = "    ") -> list[str]:
    lines = []
    for section, values in settings.items():
        if isinstance(values, dict):
            inner = ", ".join(f"{k}={v}" for k, v in values.items())
            lines.append(f"{indent}{section}: {inner}")
        else:
            lines.append(f"{indent}{section}: {values}")
    return lines


def _worker_lines(workers: tuple[WorkerStats, ...]) -> list[str]:
    if not workers:
        return ["  per worker: no segments"]
    lines = ["  per worker:"]
    width = max(len(w.worker) for w in workers)
    for w in workers:
        speed = f"{w.audio_per_decode_s:.1f}x" if w.audio_per_decode_s is not None else "-"
        lines.append(f"    {w.worker:<{width}}  {w.segments:>7} segments  {w.audio_s:>10.1f} s audio  "
                     f"{w.decode_s:>8.1f} s decoding  {speed} audio s per decode s")
    return lines


def truncation_text(truncated: int, by_cause: dict[str, int]) -> str:
    """"N stopped at the token limit (R repetition loops, F did not fit)": the causes of
    quality.truncation_cause, as the run's summary and ``inspect`` say them."""
    if not truncated:
        return "none stopped at the token limit"
    loops, unfit = by_cause.get("repetition", 0), by_cause.get("did_not_fit", 0)
    return f"{truncated} stopped at the token limit ({loops} repetition loops, {unfit} did not fit)"


def past_card_limit_text(clips: int) -> str:
    """"N clips that the card's limit cut short went on to the fit budget" (assemble.past_card_limit), as the
    run's summary and ``inspect`` say it."""
    return f"{clips} {'clip' if clips == 1 else 'clips'} that the card's limit cut short went on to the fit budget"


def format_inspect(report: InspectReport) -> str:
    """The human-readable ``inspect`` text."""
    r = report
    state = "complete (_SUCCESS)" if r.complete else "not complete (no _SUCCESS: running, interrupted or failed)"
    lines = [f"{r.out}: {state}",
             f"  files: {r.files} ({r.files_ok} ok, {r.files_failed} failed, {r.files_with_warning} with a warning)"]
    manifest_files = (r.run.get("counts") or {}).get("files")
    if manifest_files is not None and manifest_files != r.files:
        lines.append(f"  manifest files: {manifest_files} (run.json)")
    for g in r.failures:
        lines.append(f"  failed ({g.kind}): {g.count}")
        lines.extend(f"    {fid}: {err or '(no message)'}" for fid, err in g.examples)
        if g.count > len(g.examples):
            lines.append(f"    … {g.count - len(g.examples)} more")
    lines.append(f"  audio {r.audio_s / 3600:.3f} h, speech {r.speech_s / 3600:.3f} h (ok files)")
    lines.append(f"  segments: {r.segments}: {truncation_text(r.truncated_segments, r.truncated_by_cause)}; "
                 f"{r.suspect_segments} suspect by the quality signals, in {r.suspect_files} files [{r.suspect_source}]")
    if r.clips_past_card_limit:
        lines.append(f"  {past_card_limit_text(r.clips_past_card_limit)}")
    if r.run:
        wall = r.run.get("wall_s")
        rtfx = f"{r.rtfx:.1f}" if isinstance(r.rtfx, (int, float)) else "?"
        wall_text = f", {wall:.1f} s wall" if isinstance(wall, (int, float)) else ""
        lines.append(f"  RTFx {rtfx} (audio seconds per wall second{wall_text}; run.json)")
    else:
        lines.append("  RTFx: unknown (no run.json: the run has not finished)")
    lines.extend(_worker_lines(r.workers))
    if r.run:
        lines.append(f"  model: {r.run.get('model')}")
        settings = r.run.get("settings")
        if isinstance(settings, dict):
            lines.append("  settings:")
            lines.extend(_settings_lines(settings))
    return "\n".join(lines)
