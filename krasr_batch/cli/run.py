"""``krasr-batch run``: transcribe a manifest into Parquet, every option declared here."""

from __future__ import annotations

import os
from typing import Any

import click

from krasr_batch.cli.common import BadUsage, FilesFailed, RunFailed, mark_done, stopped, write_failed
from krasr_batch.cli.quiet import quiet_ray
from krasr_batch.settings import DEFAULT_MODEL, ENGINES, TOKEN_LIMIT_POLICIES, build_settings, load_preset

GLOB = click.option(
    "--glob", "globs", multiple=True, metavar="PATTERN",
    help="With a folder as input: take only the files whose path relative to it matches (fnmatch; * also "
         "crosses /). Repeat for several.")


@click.command()
@click.argument("manifest", required=False)
@click.option("-o", "--out", help="Output folder (local path or s3:// / gs:// URI).")
@GLOB
@click.option("--job", "job", type=click.Path(exists=True, dir_okay=False), help="A jobs/NAME.yaml preset; flags win over it.")
@click.option("--model", help=f"Hub id or local folder (transformers format, safetensors). [default: {DEFAULT_MODEL}]")
@click.option("--language", help="Language to force (default: kazakh); 'auto' lets Whisper detect it. A manifest line's own 'language' wins.")
@click.option("--languages", metavar="CODES",
              help="With --language auto: detect each segment's language among these only (comma-separated "
                   "Whisper codes or names, e.g. kk,ru); segments record language and language_prob. "
                   "[default: all of Whisper's languages]")
@click.option("--word-timestamps/--no-word-timestamps", "word_timestamps", default=None,
              help="Also time every word (the model's alignment heads, DTW over cross-attention) into a words/ "
                   "table; the text stays the same. [default: off]")
@click.option("--beams", type=click.IntRange(min=1), help="Beam size. [default: 3]")
@click.option("--token-limit", type=click.Choice(TOKEN_LIMIT_POLICIES),
              help="max_new_tokens per segment. fit: the card's duration table for a file decoded whole (going on "
                   "to the budget below where that limit cuts real text short), and at "
                   "least 12 tokens a second (60 up to 5 s ... 360 up to 30 s) for windows cut from longer recordings, so dense speech is not cut "
                   "short; card: the card's table for every segment (its exact call); none: the model's own "
                   "limit. [default: fit]")
@click.option("--no-token-limit", "no_token_limit", is_flag=True, default=None, hidden=True,
              help="The same as --token-limit none.")
@click.option("--max-segment-s", type=click.FloatRange(1.0, 30.0), help="Longest model window in seconds (never above 30). [default: 30]")
@click.option("--max-pause-s", type=click.FloatRange(0.0, 30.0),
              help="A pause inside a window keeps at most this many seconds of itself (its middle is skipped), so "
                   "windows hold speech rather than silence; 30 keeps every pause whole. [default: 1.0]")
@click.option("--max-gain-db", type=click.FloatRange(0.0, 100.0),
              help="A quiet file (its loudest 32 ms below -25 dBFS) is raised by up to this many dB, for speech "
                   "detection and the model, which miss or misread quiet speech; 0 takes the audio as it is, as "
                   "the card's call does. [default: 50]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Segments per model call. [default: on a GPU 64 with torch, 16 with transformers; on a CPU 16 with ctranslate2 and torch, 1 with transformers]")
@click.option("--address", help="Address of a running Ray cluster (e.g. ray://head:10001 or auto); local: an embedded "
              "local Ray. [default: $RAY_ADDRESS, else an embedded local Ray]")
@click.option("--actors", type=click.IntRange(min=1), help="Model replicas. [default: one per GPU; on CPUs one single-threaded replica per core (up to 32), fewer where a node's memory holds fewer, and for a small job]")
@click.option("--num-cpus", type=click.IntRange(min=1), help="CPUs for the embedded local Ray. [default: all]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the model runs. [default: auto]")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16", "int8"]),
              help="Model precision (float32: text independent of what shares a batch): auto is float16 on CUDA; on a CPU float32 with transformers, bfloat16 with "
                   "torch where the CPU has bfloat16 units (AMX, AVX512-BF16; else float32), and with ctranslate2 "
                   "a bfloat16 encoder and float32 decoder on such CPUs, else int8; int8 (ctranslate2, "
                   "transformers) quantizes the linear layers (faster, text may differ from the card's). "
                   "[default: auto]")
@click.option("--engine", type=click.Choice(ENGINES),
              help="auto: the fastest engine that keeps the card's accuracy on the device (torch on GPUs and on "
                   "CPUs with bfloat16 units, else ctranslate2; README, Engines). transformers: the "
                   "model card's own generate() call, its output byte for byte. ctranslate2: the same weights "
                   "converted once to CTranslate2 (cached), the same settings; several times faster on a CPU. "
                   "torch: Whisper and a batched beam search in plain torch, a window's beams sharing its "
                   "cross-attention (GPUs and CPUs). The last two can differ from the card's text on "
                   "uncertain audio. [default: auto]")
@click.option("--input-root", type=click.Path(file_okay=False), help="Refuse every audio path that does not resolve inside this folder.")
@click.option("--max-failed-fraction", type=click.FloatRange(0.0, 1.0),
              help="Stop when more than this fraction of files failed (checked once 100 files are done). [default: 0.1]")
@click.option("--stall-timeout", "stall_timeout", type=click.FloatRange(min=0.0), metavar="SECONDS",
              help="Stop (exit 1, finished files kept) once no result has come back for this long while Ray holds "
                   "work that no node has room for; the progress line names it after 2 minutes. 0: wait "
                   "forever. [default: 600]")
@click.option("--pass-files", type=click.IntRange(min=1), metavar="N",
              help="Files per pipeline execution: a larger manifest goes through in passes of N files, one after "
                   "another, so the driver's memory stays bounded (it grows with a pass's files); each pass "
                   "starts the model replicas anew. [default: 50000]")
@click.option("--overwrite", is_flag=True, help="Replace what --out holds instead of resuming it.")
@click.option("--retry-failed", is_flag=True,
              help="Resume, and also do again the files an earlier run into --out committed as failed (a mount "
                   "that was down, storage that refused): their rows are replaced, never doubled.")
@click.option("--flush-s", type=click.FloatRange(min=0.0), hidden=True, help="Commit finished files at least this often.")
@click.option("--flush-files", type=click.IntRange(min=1), hidden=True, help="Commit once this many files are finished.")
@click.option("--progress/--no-progress", default=True, help="Show the progress line on stderr.")
@click.option("--progress-every", "progress_every", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Seconds between progress lines. Off a terminal (a job log) each is a new line, and one comes at "
                   "once when a pass starts or a stall is named. [default: 2 on a terminal, else 30]")
@click.option("--actor-resource", metavar="NAME",
              help="Place model actors only on nodes with this custom Ray resource (each actor takes 1 unit; "
                   "ray start --resources='{\"NAME\": 1}'). [default: GPU nodes when the cluster has GPUs]")
@click.option("--ship-code/--no-ship-code", "ship_code", default=None,
              help="Send this krasr_batch package to the cluster's workers with the run (Ray runtime_env "
                   "py_modules; `run` does so only with --address). Turn off when the nodes have this "
                   "version installed. [default: on]")
def run(manifest: str | None, out: str | None, job: str | None, overwrite: bool, retry_failed: bool, progress: bool,
        progress_every: float | None, globs: tuple[str, ...], **flags: Any) -> None:
    """Transcribe every file of MANIFEST into Parquet under --out.

    MANIFEST is JSON Lines (krasr-batch's or NeMo's), a list of paths one a line (a .txt file, or `-` for
    standard input: `find archive -name '*.wav' | krasr-batch run - ...`), a CSV or TSV file, a Parquet table,
    Hugging Face dataset shards (a .parquet file or a pattern such as 'data/test-*.parquet'), a folder /
    s3:// prefix of recordings (a sidecar NAME.txt is the reference text), or one recording, or a pattern of
    them ('calls/*.mp3').

    Rerunning the same command with the same --out continues where the last run stopped.
    """
    from krasr_batch.cluster import ClusterAuthError
    from krasr_batch.manifest import ManifestError
    from krasr_batch.pipeline import ModelUnavailable, OutputBusy, RunAborted, SettingsMismatch
    from krasr_batch.pipeline import run as run_pipeline
    from krasr_batch.storage import WriteFailed

    if flags.pop("no_token_limit"):
        flags["token_limit"] = "none"
    manifest, out, settings = job_settings(job, flags, manifest, out)
    verbose = click.get_current_context().find_root().params.get("verbose", 0) > 0
    console = None
    try:
        with quiet_ray(out, verbose) as console:
            stats = run_pipeline(manifest, out, settings, overwrite=overwrite, progress=progress,
                                 progress_stream=console.stream, globs=globs, progress_every=progress_every,
                                 retry_failed=retry_failed)
    except (ManifestError, SettingsMismatch, OutputBusy, ModelUnavailable, ClusterAuthError) as e:
        raise BadUsage(str(e)) from None
    except RunAborted as e:
        _ray_problems(console)
        raise RunFailed(str(e)) from None
    except WriteFailed as e:
        raise write_failed(e) from None
    except KeyboardInterrupt as e:
        raise stopped(e) from None
    except BaseException:
        _ray_problems(console)
        raise
    _summary(stats, out, console.log_path)
    _ray_problems(console)
    mark_done()  # committed, Ray shut down, summary printed: nothing left for the exit to do
    if stats.output_failed:
        raise FilesFailed()


def job_settings(job: str | None, flags: dict[str, Any], manifest: str | None,
                 out: str | None) -> tuple[str, str, Any]:
    """(manifest, out, settings) of a command: the --job preset's options, then the flags given (those not
    given are None); MANIFEST and --out as given, else as the preset names them."""
    options: dict[str, Any] = {}
    if job:
        try:
            options.update(load_preset(job))
        except ValueError as e:
            raise BadUsage(str(e)) from None
    options.update({k: v for k, v in flags.items() if v is not None})
    if "address" in flags and not options.get("address") and os.environ.get("RAY_ADDRESS"):
        # Ray's convention: a cluster named in $RAY_ADDRESS (a head node's shell, a Ray job's driver) is the
        # one to use; before, ray.init connected there with the embedded Ray's arguments and waited silently
        options["address"] = os.environ["RAY_ADDRESS"]
        click.echo(f"krasr-batch: using the Ray cluster at $RAY_ADDRESS ({options['address']}); "
                   "--address local runs on an embedded local Ray instead", err=True)
    manifest = manifest or options.get("manifest")
    out = out or options.get("out")
    options.pop("manifest", None)
    options.pop("out", None)
    if not manifest:
        raise click.UsageError("give a MANIFEST (or a --job preset that names one)")
    if not out:
        raise click.UsageError("give --out DIR (or a --job preset that names one)")
    try:
        return manifest, out, build_settings(options)
    except (TypeError, ValueError) as e:
        raise BadUsage(str(e)) from None


def _ray_problems(console) -> None:
    """One line for what Ray logged that looks like a real problem (the whole log is in the file it names)."""
    if console is None or not console.log_path:
        return
    if console.problems:
        more = f" (and {len(console.problems) - 1} more such lines)" if len(console.problems) > 1 else ""
        click.echo(f"krasr-batch: Ray reported a problem: {console.problems[0][:300]}{more}; "
                   f"see {console.log_path}", err=True)


def _summary(stats, out: str, log_path: str | None = None) -> None:
    from krasr_batch.report import past_card_limit_text, truncation_text

    echo = click.echo
    echo("")
    echo(f"krasr-batch: {stats.total_files} files in the manifest; {stats.files_done} processed in this run"
         + (f" ({stats.retried_files} of them failed before, retried)" if stats.retried_files else "")
         + (f", {stats.skipped_files} already done by an earlier run" if stats.skipped_files else ""))
    echo(f"  this run: ok {stats.files_ok}, failed {stats.files_failed}; {stats.segments} segments: "
         f"{truncation_text(stats.truncated_segments, stats.truncated_by_cause)}; "
         + (f"{past_card_limit_text(stats.clips_past_card_limit)}; " if stats.clips_past_card_limit else "")
         + f"{stats.suspect_segments} suspect by the quality signals")
    echo(f"  output: ok {stats.output_ok}, failed {stats.output_failed}"
         + (f" ({stats.output_other} of them committed by earlier runs from lines not in this manifest)" if stats.output_other else ""))
    echo(f"  audio {stats.audio_s / 3600:.3f} h (speech {stats.speech_s / 3600:.3f} h) in {stats.wall_s:.1f} s: "
         f"RTFx {stats.rtfx:.1f}")
    for label, groups in (("failed", stats.output_failures_by_kind), ("warning", stats.warnings_by_kind)):
        for kind, ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(ids[:5]) + (f", … ({len(ids) - 5} more)" if len(ids) > 5 else "")
            echo(f"  {label} ({kind}): {len(ids)}: {shown}")
    echo(f"  written: {out}/segments/, {out}/files/, {out}/run.json")
    if log_path:
        echo(f"  Ray's messages: {log_path} (-v shows them here)")
