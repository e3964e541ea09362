"""``krasr-batch manifest`` and ``plan``: what an input holds, before any model is loaded.

``manifest`` writes the JSON Lines manifest an input stands for (a folder, CSV, Parquet, dataset shards,
NeMo JSON Lines), so it can be edited and run. ``plan`` decodes and segments every file on CPUs, as a run
would, and reports hours, windows, token limits, failures and the measured throughput.
"""

from __future__ import annotations

import json
from typing import Any

import click

from krasr_batch.cli.common import BadUsage, FilesFailed, RunFailed, stopped, write_failed
from krasr_batch.cli.run import GLOB, job_settings, run

# the run options a plan takes: where to read and write, the segmentation, and where to run
_PLAN_OPTIONS = ("out", "job", "language", "token_limit", "max_segment_s", "max_gain_db", "address", "num_cpus",
                 "input_root", "max_failed_fraction", "stall_timeout", "pass_files", "overwrite", "progress",
                 "progress_every", "ship_code")


@click.command("manifest")
@click.argument("source")
@GLOB
def manifest_command(source: str, globs: tuple[str, ...]) -> None:
    """Write SOURCE's manifest as JSON Lines on stdout (id, path, language, text, other fields).

    SOURCE is anything `run` takes: a folder or s3:// prefix (ids are relative paths, a sidecar NAME.txt is
    the text; one not in UTF-8 is left out, with a warning on stderr), CSV/TSV, Parquet, dataset shards, NeMo
    or krasr-batch JSON Lines, a list of paths, one recording or a pattern of them. Paths come out absolute.
    """
    from krasr_batch.cli.cluster import job_line
    from krasr_batch.manifest import ManifestError, iter_manifest

    try:
        for job in iter_manifest(source, globs):
            click.echo(json.dumps(job_line(job), ensure_ascii=False, default=str))
            if job.warning:  # a sidecar text not in UTF-8: the line has no text, and stderr says why
                click.echo(f"warning: {job.file_id}: {job.warning}", err=True)
    except ManifestError as e:
        raise BadUsage(str(e)) from None


@click.command("plan", params=[p for p in run.params if p.name in _PLAN_OPTIONS])
@click.argument("manifest")
@GLOB
def plan_command(manifest: str, out: str | None, job: str | None, overwrite: bool, progress: bool,
                 progress_every: float | None, globs: tuple[str, ...], **flags: Any) -> None:
    """Decode and segment every file of MANIFEST (or folder) on CPUs, without a model: what a run would cost.

    Writes the files/ rows a run would (status, error, duration_s, speech_s, num_segments; no text), the
    planned windows in segments/ and a summary in plan.json: hours of audio and speech, windows by token
    limit, failures by cause, decode-and-segment throughput. Rerun the same command to resume.
    """
    from krasr_batch.cluster import ClusterAuthError
    from krasr_batch.manifest import ManifestError
    from krasr_batch.pipeline import OutputBusy, RunAborted, SettingsMismatch, format_plan, plan
    from krasr_batch.storage import WriteFailed

    manifest, out, settings = job_settings(job, flags, manifest, out)
    from krasr_batch.cli.quiet import quiet_ray

    verbose = click.get_current_context().find_root().params.get("verbose", 0) > 0
    try:
        with quiet_ray(out, verbose) as console:  # Ray's own lines to OUT/logs/, as for run
            report = plan(manifest, out, settings, overwrite=overwrite, progress=progress,
                          progress_stream=console.stream, globs=globs, progress_every=progress_every)
    except (ManifestError, SettingsMismatch, OutputBusy, ClusterAuthError) as e:
        raise BadUsage(str(e)) from None
    except RunAborted as e:
        raise RunFailed(str(e)) from None
    except WriteFailed as e:
        raise write_failed(e) from None
    except KeyboardInterrupt as e:
        raise stopped(e) from None
    click.echo(format_plan(report, out))
    if report.files_failed:
        raise FilesFailed()
