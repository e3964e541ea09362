"""``krasr-batch plan``: what a run would cost, measured by doing everything a run does before the model.

    read the normalized manifest ─► repartition ─► flat_map(plan_file) ─► assemble + commit on the driver

``plan_file`` is the run's own decode-and-segment task (:func:`krasr_batch.pipeline.stages.segment_file`)
without the segments' audio, so a plan's ``files/`` rows (status, error, durations, speech seconds, segment
counts) and ``segments/`` rows (windows and their token limits, no text) are the ones a run would write. The
output folder follows the run's commit protocol, so a plan resumes like a run; its settings stamp is the
segmentation's alone, and a run is refused into a plan's folder. :func:`summarize` reads the whole folder
back into a :class:`PlanReport`, written as ``plan.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from krasr_batch.manifest import ManifestSummary
from krasr_batch.output import (
    OutputLayout,
    PartWriter,
    RunOutput,
    claim_output,
    failures_by_kind,
    mark_success,
    open_output,
    recover,
    write_bytes_atomic,
)
from krasr_batch.pipeline.assemble import Assembler, Progress, RunStats
from krasr_batch.pipeline.orchestrate import (
    ROWS_PER_SEGMENT_TASK,
    _check_settings,
    _drain_passes,
    _init_ray,
    _manifest_groups,
    _read_manifest,
    _sized,
    _versions,
    check_committed,
    limit_malloc_arenas,
    prepare_output,
    shutdown_ray,
)
from krasr_batch.pipeline.stages import plan_file
from krasr_batch.settings import MAX_WINDOW_S, RunSettings
from krasr_batch.storage import join


def plan_fingerprint(settings: RunSettings) -> str:
    """What a plan's output depends on: the segmentation, and the token-limit policy (``max_new_tokens``)."""
    payload = json.dumps({"plan": dataclasses.asdict(settings.segment), "token_limit": settings.decode.token_limit},
                         sort_keys=True)
    return "plan-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlanReport:
    """What a plan found over the whole output folder (earlier, resumed invocations included)."""

    files: int
    files_ok: int
    files_failed: int
    files_with_warning: int
    failures_by_kind: dict[str, int]
    audio_s: float  # ok files
    speech_s: float
    segments: int  # model windows of at most 30 s, one encoder pass each
    segments_by_token_limit: dict[int, int]  # max_new_tokens -> segments
    fixed_windows_30s: int  # plain 30 s windows over the same ok audio, without VAD (sum of ceil(duration / 30))
    segment_task_s: float  # CPU-task seconds spent decoding and segmenting (files/ segment_wall_s)
    # this invocation: audio seconds decoded and segmented, wall seconds, CPUs Ray had
    run_audio_s: float = 0.0
    run_wall_s: float = 0.0
    cpus: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def audio_per_task_s(self) -> float | None:
        """Decode-and-segment throughput per CPU: audio seconds per task second."""
        return self.audio_s / self.segment_task_s if self.segment_task_s > 0 else None

    @property
    def audio_per_wall_s(self) -> float | None:
        """This invocation's throughput on all its CPUs: audio seconds per wall second of the command."""
        return self.run_audio_s / self.run_wall_s if self.run_wall_s > 0 and self.run_audio_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["segments_by_token_limit"] = {str(k): v for k, v in sorted(self.segments_by_token_limit.items())}
        d.update(audio_h=self.audio_s / 3600, speech_h=self.speech_s / 3600,
                 audio_per_task_s=self.audio_per_task_s, audio_per_wall_s=self.audio_per_wall_s, **self.extra)
        return d


def summarize(output: RunOutput, stats: RunStats | None = None, cpus: float | None = None) -> PlanReport:
    """A plan's figures from its output folder (``stats``: this invocation's, for the wall-clock throughput)."""
    rows = output.files_table(["file_id", "status", "error_kind", "warning", "duration_s", "speech_s",
                               "segment_wall_s"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    by_limit: dict[int, int] = {}
    segments = 0
    for batch in output.segment_batches(["max_new_tokens"]):
        for limit in batch.column(0).to_pylist():
            by_limit[limit] = by_limit.get(limit, 0) + 1
            segments += 1
    return PlanReport(
        files=len(rows), files_ok=len(ok), files_failed=len(rows) - len(ok),
        files_with_warning=sum(1 for r in rows if r.get("warning")),
        failures_by_kind={k: len(v) for k, v in sorted(failures_by_kind(rows).items(), key=lambda kv: -len(kv[1]))},
        audio_s=sum(r["duration_s"] or 0.0 for r in ok),
        speech_s=sum(r["speech_s"] or 0.0 for r in ok),
        segments=segments, segments_by_token_limit=by_limit,
        fixed_windows_30s=sum(math.ceil((r["duration_s"] or 0.0) / MAX_WINDOW_S) for r in ok),
        segment_task_s=sum(r.get("segment_wall_s") or 0.0 for r in rows),
        run_audio_s=stats.audio_s if stats else 0.0, run_wall_s=stats.wall_s if stats else 0.0, cpus=cpus)


def plan(manifest: str, out: str, settings: RunSettings, overwrite: bool = False, progress: bool = True,
         progress_stream=None, globs: tuple[str, ...] = (), progress_every: float | None = None) -> PlanReport:
    """Decode and segment every file of ``manifest`` into ``out`` without a model; returns the plan's figures.

    Raises ManifestError for a bad manifest, SettingsMismatch for an ``out`` made with other settings (or by a
    run), OutputBusy for an ``out`` another run or plan is writing, RunAborted when too many files fail.
    """
    import ray

    t0 = time.perf_counter()
    limit_malloc_arenas()
    layout = OutputLayout(out)
    with claim_output(out, "plan"):
        _check_settings(layout, settings, manifest, overwrite, fingerprint=plan_fingerprint(settings))
        normalized, summary, stats, writer, todo = prepare_output(layout, manifest, globs)
        started_ray = _init_ray(settings) if todo else False
        cpus = ray.cluster_resources().get("CPU") if todo else None
        prog = Progress(stats, progress, progress_stream, progress_every)
        try:
            if todo:
                _execute_plan(normalized, settings, summary, stats, writer, prog)
        finally:
            prog.close()
            if started_ray:
                shutdown_ray()
        stats.wall_s = time.perf_counter() - t0
        check_committed(normalized, summary, recover(layout), "plan")
        report = summarize(open_output(out), stats, cpus)
        info = {"manifest": manifest, "out": out, "settings": {"segment": dataclasses.asdict(settings.segment),
                                                               "token_limit": settings.decode.token_limit},
                "passes": stats.passes, "versions": _versions(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **report.to_dict()}
        write_bytes_atomic((json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode(), join(out, "plan.json"))
        mark_success(layout)
        return report


def _execute_plan(normalized: str, settings: RunSettings, summary: ManifestSummary, stats: RunStats,
                  writer: PartWriter, prog: Progress) -> None:
    def graph(part: list):
        # one repartition task at a time, holding no CPU: the plan's tasks take whole CPUs, and repartition
        # tasks holding one each (Ray Data's default) while they wait for those tasks to take their blocks
        # keep CPUs from them (150,000 files on 2 CPUs: 8,552 planned in the first 150 s with Ray's default,
        # 10,928 so)
        ds = _sized(_read_manifest(normalized, part).repartition(target_num_rows_per_block=ROWS_PER_SEGMENT_TASK), 0)
        return ds.flat_map(plan_file, fn_kwargs=dict(
            segment_options=settings.segment, default_language=settings.decode.language,
            input_root=settings.resources.input_root, token_limit=settings.decode.token_limit), num_cpus=1)

    _drain_passes(_manifest_groups(normalized), graph, Assembler(summary, stats, decoded=False), stats, writer, prog,
                  settings)


def format_plan(report: PlanReport, out: str) -> str:
    """The plan's summary as text."""
    r = report
    lines = [f"krasr-batch plan: {r.files} files ({r.files_ok} ok, {r.files_failed} failed, "
             f"{r.files_with_warning} with a warning)"]
    lines.append(f"  audio {r.audio_s / 3600:.3f} h, speech {r.speech_s / 3600:.3f} h (ok files)")
    limits = ", ".join(f"{k}: {v}" for k, v in sorted(r.segments_by_token_limit.items()))
    lines.append(f"  segments (model windows of at most 30 s): {r.segments}; by token limit {limits or '-'}")
    lines.append(f"  plain 30 s windows over the same audio, without VAD: {r.fixed_windows_30s}")
    for kind, n in r.failures_by_kind.items():
        lines.append(f"  failed ({kind}): {n}")
    per_task = f"{r.audio_per_task_s:.1f}" if r.audio_per_task_s else "-"
    line = f"  decode and segment: {per_task} audio s per CPU-task second"
    if r.audio_per_wall_s:
        cpus = f" on {r.cpus:g} CPUs" if r.cpus else ""
        line += f"; this invocation {r.audio_per_wall_s:.1f} audio s per wall second{cpus} ({r.run_wall_s:.1f} s)"
    lines.append(line)
    lines.append(f"  written: {out}/files/, {out}/segments/, {out}/plan.json")
    return "\n".join(lines)
