"""``krasr-batch submit``, ``status`` and ``logs``: handing a run to a Ray cluster through the Jobs API.

``submit`` takes the ``run`` command's own options (read from ``run.params``, so the two never drift
apart) and turns them back into a ``python -m krasr_batch.cli run ... --address auto`` entrypoint
that Ray's job manager starts on the head node. The job's runtime_env ships the ``krasr_batch`` package
(``py_modules``), the object-storage location variables and, for a local manifest, a copy of it with every
path resolved. Everything else a run touches (audio, ``--out``, a local ``--model``) is read on the cluster,
so it must be reachable from there: object storage (``s3://``, ``gs://``) or a filesystem mounted at the same
path on every node.

``run`` declares the cluster options (``--actor-resource``, ``--ship-code/--no-ship-code``) itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

import click
from click.core import ParameterSource

from krasr_batch import __version__
from krasr_batch.cli.common import EXIT_FAILED_RUN, EXIT_INTERRUPTED, EXIT_OK, BadUsage, RunFailed, exit_with
from krasr_batch.cli.run import run
from krasr_batch.storage import is_uri

log = logging.getLogger(__name__)

POLL_S = 2.0

# ---------------------------------------------------------------- the options of `run` that submit forwards

# `run` options that `submit` does not forward: its --address is the Jobs API (the job's run connects with
# --address auto), --num-cpus only sizes an embedded local Ray.
_NOT_FORWARDED = {"address", "num_cpus"}


def _submit_params() -> list[click.Parameter]:
    return [p for p in run.params if p.name not in _NOT_FORWARDED]


def _long_opt(opts: list[str]) -> str:
    return max(opts, key=len)


def _option_argv(param: click.Parameter, value: Any) -> list[str]:
    """A `run` option and its value as command-line words (the inverse of click's parsing)."""
    assert isinstance(param, click.Option)
    if param.is_flag:
        if param.secondary_opts:
            return [_long_opt(param.opts) if value else _long_opt(param.secondary_opts)]
        return [_long_opt(param.opts)] if value else []
    values = value if param.multiple else [value]
    out: list[str] = []
    for v in values:
        out += [_long_opt(param.opts), str(v)]
    return out


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _cluster_path(flag: str, value: str, must_exist_here: bool = False) -> str:
    """A path as the cluster will see it: URIs unchanged, local paths made absolute (with a warning)."""
    if is_uri(value):
        return value
    path = os.path.expanduser(value)
    if must_exist_here and not os.path.exists(path):
        return value  # e.g. a hub id, or a folder that exists on the cluster only
    path = os.path.abspath(path)
    _warn(f"{flag} {path} is a local path: the cluster reads it at that path, so it must be on a filesystem "
          "mounted there (use s3:// or gs:// otherwise)")
    return path


def ship_manifest(manifest: str, dest_dir: str, globs: tuple[str, ...] = ()) -> tuple[str, int, int]:
    """Validate a local manifest and write a copy into ``dest_dir`` whose lines run anywhere.

    Each line keeps its fields and line number; ``path`` becomes the resolved absolute path or URI (relative
    paths were relative to the manifest's folder) and ``id`` is written out (it defaulted to the original
    ``path``), so the job's output equals a local run's. An input of another shape (a folder, CSV, Parquet,
    dataset shards; ``globs`` applied) is written as the JSON Lines manifest it stands for. Returns (copy,
    lines, lines with local paths). Raises ManifestError for a bad manifest, before anything is submitted.
    """
    from krasr_batch.inputs import compression, input_kind, text_lines
    from krasr_batch.manifest import iter_manifest

    if input_kind(manifest) != "jsonl":  # written as it is validated: a bad entry stops here, with its number
        dest = os.path.join(dest_dir, "manifest.jsonl")
        n = local = warned = 0
        first_warning = None
        with open(dest, "w", encoding="utf-8") as out:
            for job in iter_manifest(manifest, globs):
                out.write(json.dumps(job_line(job), ensure_ascii=False) + "\n")
                n += 1
                local += not is_uri(job.path)
                if job.warning:
                    warned += 1
                    first_warning = first_warning or job.warning
        if warned:  # said at submission too; the copy carries each (input_warning) into its files/ row
            log.warning("%d file(s) came with a warning, kept in their files/ rows; the first: %s",
                        warned, first_warning)
        return dest, n, local
    for _ in iter_manifest(manifest, globs):  # the whole file first: a bad line stops here, with its number,
        pass  # before the copy below pairs its raw lines with the validated entries
    name = os.path.basename(manifest)
    if compression(manifest):  # the copy is written plain
        name = os.path.splitext(name)[0]
    dest = os.path.join(dest_dir, name or "manifest.jsonl")
    n = local = 0
    jobs = iter_manifest(manifest)
    with open(dest, "w", encoding="utf-8") as out:
        for raw in text_lines(manifest):  # as validation read them: a byte-order mark is not content
            if not raw.strip():
                out.write("\n")  # keeps line numbers (error messages, the files table) as in the original
                continue
            job = next(jobs)
            obj = json.loads(raw)
            obj["id"], obj["path"] = job.file_id, job.path
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
            local += not is_uri(job.path)
    return dest, n, local


def job_line(job) -> dict[str, Any]:
    """A FileJob as a JSON Lines manifest entry: id, path, then language, text, the reader's warning
    (``input_warning``: a sidecar text left out, say) and its other fields."""
    obj: dict[str, Any] = {"id": job.file_id, "path": job.path}
    if job.language is not None:
        obj["language"] = job.language
    if job.reference_text is not None:
        obj["text"] = job.reference_text
    if job.warning is not None:
        obj["input_warning"] = job.warning
    obj.update(job.extra)
    return obj


def _job_preset(job: str, dest_dir: str) -> tuple[dict[str, Any], str]:
    """Load a ``--job`` preset here and write its options, paths resolved, for the cluster to load."""
    import yaml

    from krasr_batch.settings import load_preset

    try:
        preset = load_preset(job)
    except ValueError as e:
        raise BadUsage(str(e)) from None
    for key in ("address", "num_cpus"):
        if preset.pop(key, None) is not None:
            _warn(f"{job}: '{key}' is ignored by submit (the job runs on the cluster it is submitted to)")
    if preset.get("input_root"):
        preset["input_root"] = _cluster_path("input_root", str(preset["input_root"]))
    if preset.get("model"):
        preset["model"] = _cluster_path("model", str(preset["model"]), must_exist_here=True)
    found = {k: preset.pop(k) for k in ("manifest", "out") if k in preset}
    dest = os.path.join(dest_dir, "job.yaml")
    with open(dest, "w", encoding="utf-8") as f:
        yaml.safe_dump(preset, f, allow_unicode=True, sort_keys=True)
    return found, dest


def _client(address: str | None):
    from krasr_batch.cluster import AUTH_MODE_ENV, auth_refused, is_auth_failure, token_source, use_cluster_token

    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BadUsage(f"the Ray Jobs client needs ray[default]: pip install 'ray[default]' ({e})") from None
    # importing ray configured its loggers at INFO; keep the SDK's upload chatter to -v
    logging.getLogger("ray").setLevel(max(logging.getLogger().getEffectiveLevel(), logging.WARNING))
    use_cluster_token()  # a token this process has goes to the cluster, also with RAY_AUTH_MODE unset
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "token" and token_source() is None:
        raise BadUsage(str(auth_refused(address))) from None  # Ray would send nothing, after a warning of its own
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection refused, wrong URL, version mismatch, ...
        if is_auth_failure(e):
            raise BadUsage(str(auth_refused(address))) from None
        raise RunFailed(f"cannot reach the Ray Jobs API at {address or '$RAY_API_SERVER_ADDRESS / $RAY_ADDRESS'}: {e}") from None


def _refused_token(e: Exception, address: str | None) -> None:
    """Exit 2 with the one-line message if the Jobs API turned this request away for its token."""
    from krasr_batch.cluster import auth_refused, is_auth_failure

    if is_auth_failure(e):
        raise BadUsage(str(auth_refused(address))) from None


def _job_exit_code(info) -> int:
    """The exit status a job's final state stands for: the run's own where Ray recorded it."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return EXIT_OK
    if status == "STOPPED":
        return EXIT_INTERRUPTED
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else EXIT_FAILED_RUN


def _wait(client, job_id: str):
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(POLL_S)


def _follow_logs(client, job_id: str) -> None:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream closed before the job ended (head restarted, network)
        _warn(f"log stream ended: {e}")


_ADDRESS = click.option(
    "--address", envvar="RAY_API_SERVER_ADDRESS", metavar="URL",
    help="The cluster's Jobs API: its dashboard, http://HEAD:8265 (ray dashboard cluster.yaml forwards it to "
         "localhost). [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS]")


def _job_inputs(opts: dict[str, Any], workdir: str) -> tuple[str, str, str, str | None]:
    """(manifest, out, the manifest as the job names it, the preset file) for a submission; a local manifest
    is validated and copied into ``workdir`` (sent with the job), as is a --job preset."""
    from krasr_batch.manifest import ManifestError

    manifest, out, job_file = opts["manifest"], opts["out"], None
    if opts["job"]:
        found, job_file = _job_preset(opts["job"], workdir)
        manifest = manifest or found.get("manifest")
        out = out or found.get("out")
    if not manifest:
        raise click.UsageError("give a MANIFEST (or a --job preset that names one)")
    if not out:
        raise click.UsageError("give --out DIR (or a --job preset that names one)")
    if is_uri(manifest):
        return manifest, out, manifest, job_file
    if manifest == "-":
        raise BadUsage("submit ships the manifest to the cluster, so it takes a file, not standard input: "
                       "save the lines first (... > manifest.jsonl) and submit that")
    try:
        shipped, lines, local = ship_manifest(manifest, workdir, opts.get("globs") or ())
    except ManifestError as e:
        raise BadUsage(str(e)) from None
    except OSError as e:
        raise BadUsage(f"cannot read the manifest {manifest}: {e}") from None
    if local:
        _warn(f"{local} of the manifest's {lines} audio paths are local paths: every cluster node must see "
              "them at the same place (a shared filesystem); use s3:// or gs:// URIs otherwise")
    return manifest, out, os.path.basename(shipped), job_file


def _entrypoint(ctx: click.Context, opts: dict[str, Any], job_manifest: str, out: str, job_file: str | None) -> list[str]:
    """The job's command: ``run`` with exactly the options given here, paths as the cluster sees them."""
    verbose = ctx.find_root().params.get("verbose") or 0
    argv = ["python", "-m", "krasr_batch.cli", *(["-" + "v" * min(verbose, 2)] if verbose else []),
            "run", job_manifest, "--out", _cluster_path("--out", out), "--address", "auto"]
    if job_file:
        argv += ["--job", os.path.basename(job_file)]
    for param in _submit_params():
        name = param.name
        # --glob: a local folder was shipped as the manifest it stands for, already narrowed
        if name in ("manifest", "job", "out", "ship_code") or not _given(ctx, name) or (
                name == "globs" and not is_uri(job_manifest)):
            continue
        value = opts[name]
        if name == "model":
            value = _cluster_path("--model", value, must_exist_here=True)
        elif name == "input_root":
            value = _cluster_path("--input-root", value)
        argv += _option_argv(param, value)
    return argv


# ---------------------------------------------------------------- submit

@click.command(params=_submit_params())
@_ADDRESS
@click.option("--submission-id", help="Job id to use (must be new on the cluster). [default: Ray picks one]")
@click.option("--follow", is_flag=True, help="Stream the job's logs until it ends; exit with the run's status.")
@click.pass_context
def submit(ctx: click.Context, address: str | None, submission_id: str | None, follow: bool, **opts: Any) -> None:
    """Hand a whole `krasr-batch run` over to a Ray cluster as a job; prints the job id.

    Takes every option of `run` (see `krasr-batch run --help`). MANIFEST, --out and audio paths are read on
    the cluster: use s3:// / gs:// URIs or a filesystem the cluster mounts at the same path. A local MANIFEST
    is checked here and sent with the job (paths resolved), as is a --job preset. Follow the job with
    `krasr-batch status JOB` and `krasr-batch logs JOB --follow`.
    """
    from krasr_batch.cluster import code_runtime_env

    workdir = tempfile.mkdtemp(prefix="krasr-submit-")
    try:
        manifest, out, job_manifest, job_file = _job_inputs(opts, workdir)
        entrypoint = shlex.join(_entrypoint(ctx, opts, job_manifest, out, job_file))
        ship_code = opts["ship_code"] is not False
        runtime_env = code_runtime_env(ship_code)
        if os.listdir(workdir):
            runtime_env["working_dir"] = workdir
        client = _client(address)
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                metadata={"krasr_batch": __version__, "manifest": str(manifest), "out": str(out)})
        except Exception as e:  # noqa: BLE001 - rejected by the cluster (duplicate id, runtime_env too large, ...)
            _refused_token(e, address)
            raise RunFailed(f"the cluster refused the job: {e}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("submitted %s: %s", job_id, entrypoint)
    click.echo(job_id)
    where = f" --address {address}" if address else ""
    if not follow:
        click.echo(f"follow it: krasr-batch status {job_id}{where} --wait; krasr-batch logs {job_id}{where} --follow",
                   err=True)
        return
    _follow_logs(client, job_id)
    info = _wait(client, job_id)
    click.echo(f"{job_id}: {info.status}", err=True)
    exit_with(_job_exit_code(info))


# ---------------------------------------------------------------- status, logs

def _fmt_ms(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


@click.command()
@click.argument("job_id", metavar="JOB")
@_ADDRESS
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit 0 if it succeeded, else the run's exit status.")
def status(job_id: str, address: str | None, wait: bool) -> None:
    """Show the state of a submitted job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    client = _client(address)
    try:
        info = _wait(client, job_id) if wait else client.get_job_info(job_id)
    except RuntimeError as e:  # unknown job: the API answers 404
        _refused_token(e, address)
        raise BadUsage(f"no job {job_id} on {address or 'the cluster'}: {e}") from None
    exit_code = getattr(info, "driver_exit_code", None)
    click.echo(f"{job_id}\t{info.status}" + (f"\texit {exit_code}" if exit_code is not None else ""))
    if info.message:
        click.echo(f"  {info.message}")
    click.echo(f"  started {_fmt_ms(info.start_time)}, ended {_fmt_ms(info.end_time)}")
    click.echo(f"  entrypoint: {info.entrypoint}")
    if wait:
        exit_with(_job_exit_code(info))


@click.command()
@click.argument("job_id", metavar="JOB")
@_ADDRESS
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the job ends; exit with the run's status.")
def logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print a submitted job's output (the run's progress lines and summary)."""
    client = _client(address)
    try:
        client.get_job_info(job_id)
    except RuntimeError as e:
        _refused_token(e, address)
        raise BadUsage(f"no job {job_id} on {address or 'the cluster'}: {e}") from None
    if not follow:
        click.echo(client.get_job_logs(job_id), nl=False)
        return
    _follow_logs(client, job_id)
    exit_with(_job_exit_code(_wait(client, job_id)))
