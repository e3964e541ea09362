"""Orchestration on the driver: Ray init, placement, the Ray Data graph, the commit loop and ``run.json``.

    read_parquet(normalized manifest)          one row per file
      .repartition(target_num_rows_per_block)  small blocks, so many files are segmented at once
      .flat_map(segment_file)                  CPU tasks: decode, VAD, cut; one row per segment + one per file
      .map_batches(ModelStage, concurrency=N)  actor pool, one model replica per actor (num_gpus=1 on GPUs)
      .iter_batches() on the driver            assemble finished files, commit them as Parquet parts

The driver commits a file only when all of its segments are back (see output/writer.py for the protocol),
which is what lets a rerun skip finished files and never double a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from krasr_batch import __version__
from krasr_batch.engines import FIT_TOKENS_PER_S, check_model, choose_engine
from krasr_batch.engines.base import model_languages as model_language_codes
from krasr_batch.manifest import ManifestSummary, normalize_manifest
from krasr_batch.output import (
    OutputError,
    OutputLayout,
    PartWriter,
    claim_output,
    clear_output,
    drop_failed,
    failures_by_kind,
    mark_success,
    open_output,
    read_text,
    recover,
    unmark_success,
    write_bytes_atomic,
    write_run_json,
)
from krasr_batch.pipeline.assemble import Assembler, Progress, RunStats, check_failures
from krasr_batch.pipeline.errors import ModelUnavailable, RunAborted, RunStalled, SettingsMismatch, Terminated
from krasr_batch.pipeline.stages import model_stage_class, segment_file
from krasr_batch.pipeline.watch import Feed, StallWatch
from krasr_batch.schema import files_schema
from krasr_batch.settings import RunSettings
from krasr_batch.storage import filesystem, is_uri, join, writing

log = logging.getLogger(__name__)

ROWS_PER_SEGMENT_TASK = 4  # files per decode-and-segment block
REPARTITION_TASKS = 1  # tasks of each repartition at once (see _sized)


MALLOC_ARENAS = 2  # glibc malloc arenas of the driver process (see limit_malloc_arenas)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """At most ``arenas`` glibc malloc arenas in this process from now on (``mallopt(M_ARENA_MAX)``); True if set.

    glibc gives each thread that allocates its own arena, up to eight per core, and memory freed in one
    arena is reused only by the threads allocating there. The driver's threads (Ray's core worker and gRPC,
    Ray Data's executor, the feed) each took memory that the next pass's threads did not reuse, and the
    driver grew with the files of a run: 6 KB a file over 2,000-file passes with glibc's default arenas,
    under 3 KB with two (BENCHMARKS.md, "The driver's memory"). Only this process: Ray's workers are
    started with their own. A ``MALLOC_ARENA_MAX`` set in the environment wins; elsewhere than glibc
    (macOS, musl) nothing is done. Call it before the threads start (``run`` and ``plan`` do, first).
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to ask, or not glibc's
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(-8, arenas) == 1  # M_ARENA_MAX; mallopt returns 1 on success


def _init_ray(settings: RunSettings):
    import ray

    if ray.is_initialized():
        return False
    res = settings.resources
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if res.address:
        from krasr_batch.cluster import (
            auth_refused,
            driver_runtime_env,
            is_auth_failure,
            unreachable,
            use_cluster_token,
        )

        why = unreachable(res.address)
        if why:
            raise RunAborted(f"cannot connect to the Ray cluster at {res.address}: nothing answers there ({why})")
        use_cluster_token()  # a token this process has goes to the cluster, as Ray does for "auto"
        # workers import krasr_batch: ship this process's copy (and the storage endpoint) to the cluster.
        # Ray's C++ client writes its connection retries to stderr: held back, so that a refused token
        # ends in one line, and shown for any other failure.
        with _stderr_captured() as said:
            try:
                ray.init(address=res.address, runtime_env=driver_runtime_env(res.ship_code), **kwargs)
                error = None
            except Exception as e:  # noqa: BLE001 - sorted out below
                error = e
        if error is not None:
            if is_auth_failure(error, said()):
                raise auth_refused(res.address) from None
            sys.stderr.write(said())
            raise RunAborted(f"cannot connect to the Ray cluster at {res.address}: {error}") from error
        sys.stderr.write(said())
    else:
        # "local": a new Ray of our own even where $RAY_ADDRESS names a cluster (--address local) or one runs here
        with _sighup_ignored_by_children():
            ray.init(address="local", num_cpus=res.num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                     **kwargs)
    _stop_on_signals()
    return True


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _sighup_ignored_by_children():
    """SIGHUP ignored while the embedded Ray starts: its processes (GCS, raylet, workers) inherit the ignore
    across exec, as under ``nohup``. A closed terminal sends SIGHUP to the run's whole process group; Ray's
    processes died of it while the driver was still committing, and Ray then ended the driver with exit 1
    and no message (2 of 3 tries before this). The driver alone takes it (:func:`_stop_on_signals`) and shuts them down."""
    main = threading.current_thread() is threading.main_thread()
    saved = signal.signal(signal.SIGHUP, signal.SIG_IGN) if main else None
    try:
        yield
    finally:
        if saved is not None:  # None: not ours to restore (another thread, or a handler installed outside Python)
            signal.signal(signal.SIGHUP, saved)


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _stop_on_signals() -> None:
    """From here on SIGTERM and SIGHUP stop the run as Ctrl-C does: finished files are committed, Ray is shut
    down, the command says so and exits 143 (SIGTERM) or 129 (SIGHUP).

    ``ray.init`` leaves SIGTERM to the handler of Ray's C++ core worker, which prints a stack trace and
    aborts the process (signal 6): a batch scheduler's stop (Slurm's time limit, a Kubernetes eviction)
    ended a run with no word of what became of it, and the files it had finished but not yet committed were
    decoded again by the next run. SIGHUP (the ssh session of a run started without nohup or tmux dropped)
    ended it the same way, silently, by its default action. Only the main thread can take a signal handler;
    elsewhere (a caller's thread) Ray's stays.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _raise_terminated)


def shutdown_ray() -> None:
    """``ray.shutdown()``, then SIGTERM and SIGHUP back to their default action (see :func:`_stop_on_signals`)."""
    import ray

    ray.shutdown()
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is _raise_terminated:
                signal.signal(sig, signal.SIG_DFL)


class _stderr_captured:
    """Holds back what this process (Python or C++) writes to file descriptor 2; ``said()`` returns it."""

    def __enter__(self):
        import tempfile

        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        self._text = ""
        return lambda: self._text

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self._text = self._tmp.read().decode(errors="replace")
        self._tmp.close()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"krasr-batch": __version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "ctranslate2", "ray", "silero-vad", "onnxruntime", "soundfile", "soxr", "av", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _check_settings(layout: OutputLayout, settings: RunSettings, manifest: str, overwrite: bool,
                    fingerprint: str | None = None) -> None:
    """Refuse an ``out`` made with other settings (``fingerprint``, the run's by default); stamp a new one."""
    fingerprint = fingerprint or settings.output_fingerprint()
    stamp_path = join(layout.work, "settings.json")
    if overwrite:
        clear_output(layout)
    previous = read_text(stamp_path)
    if previous:
        prev = json.loads(previous)
        if prev.get("fingerprint") != fingerprint:
            raise SettingsMismatch(
                f"{layout.out} holds output of a run with other model or decoding settings "
                f"(model {prev.get('settings', {}).get('decode', {}).get('model')!r}). "
                "Use another --out, or --overwrite to replace it.")
        return
    fs, p = filesystem(layout.work)
    with writing(layout.work):
        fs.create_dir(p, recursive=True)
    write_bytes_atomic(json.dumps({"fingerprint": fingerprint, "manifest": manifest,
                                   "settings": settings.to_dict()}, indent=2).encode(), stamp_path)


def run(manifest: str, out: str, settings: RunSettings, overwrite: bool = False, progress: bool = True,
        progress_stream=None, globs: tuple[str, ...] = (), progress_every: float | None = None,
        retry_failed: bool = False) -> RunStats:
    """Transcribe every file of ``manifest`` into ``out``; returns the run's statistics. ``retry_failed``: files
    an earlier run committed as failed are done again (:func:`~krasr_batch.output.drop_failed`).

    ``manifest`` is any input :mod:`krasr_batch.inputs` reads (a folder, CSV, Parquet, dataset shards, JSON
    Lines); ``globs`` narrow a folder's files. ``progress_every``: seconds between progress lines (default:
    :class:`~krasr_batch.pipeline.assemble.Progress`'s, 2 on a terminal, 30 elsewhere).

    Raises ModelUnavailable (local runs) or ManifestError before any work for a model that does not load or a
    bad manifest, SettingsMismatch for an ``out`` made with other settings, OutputBusy for an ``out`` another
    run is writing, RunAborted when too many files fail.
    """
    import ray

    t0 = time.perf_counter()
    limit_malloc_arenas()
    requested = settings.decode.engine
    ray_was_up = ray.is_initialized()  # a caller's own Ray session is left running
    try:
        with claim_output(out, "run"):  # before Ray starts: a second run into this out stops at once
            settings, why = _resolve_engine(settings)
            return _run(manifest, out, settings, overwrite, progress, progress_stream, progress_every, t0,
                        {"requested": requested, "chosen": settings.decode.engine, "why": why}, globs, retry_failed)
    finally:
        if not ray_was_up and ray.is_initialized():
            shutdown_ray()


def _resolve_engine(settings: RunSettings) -> tuple[RunSettings, str]:
    """``--engine auto`` resolved for the device the replicas will run on: (settings, why). Done before the
    output's fingerprint, so that a rerun on the same machine resumes; on a cluster it connects to Ray."""
    if settings.decode.engine != "auto":
        return settings, "asked for with --engine"
    res = settings.resources
    if res.device in ("cpu", "cuda"):
        use_gpu = res.device == "cuda"
    elif res.address:  # the cluster's nodes decide, as plan_placement will
        import ray

        _init_ray(settings)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    else:
        from krasr_batch.engines import resolve_device

        use_gpu = resolve_device("auto") == "cuda"
    engine, why = choose_engine(use_gpu, settings.decode.dtype)
    log.info("--engine auto: %s (%s)", engine, why)
    return settings.with_engine(engine), why


def _run(manifest: str, out: str, settings: RunSettings, overwrite: bool, progress: bool, progress_stream,
         progress_every: float | None, t0: float, engine: dict[str, Any], globs: tuple[str, ...] = (),
         retry_failed: bool = False) -> RunStats:
    import ray

    layout = OutputLayout(out)
    model_languages = None  # the model's language codes, checked against the manifest's (known here only)
    if not settings.resources.address:  # on a cluster the nodes load the model; here it must load before any work
        # the check (reading the tokenizer and configs, about 4 s with its imports) runs while the embedded Ray
        # starts (about 5 s), unless the output says the job is finished (a rerun that needs no Ray at all)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="krasr-model-check") as pool:
            check = pool.submit(check_model, settings.decode)
            if not ray.is_initialized() and read_text(layout.success) is None:
                _init_ray(settings)
            try:
                model_languages = check.result()
            except RuntimeError as e:
                raise ModelUnavailable(str(e)) from e
    else:  # the nodes load the model; its languages are checked here where this machine has its folder too
        model_languages = model_language_codes(settings.decode.model)
    timeline = {"model_checked": time.perf_counter() - t0}  # on a cluster: nothing to check here
    _check_settings(layout, settings, manifest, overwrite)
    normalized, summary, stats, writer, todo = prepare_output(layout, manifest, globs, model_languages,
                                                              settings.decode.word_timestamps, retry_failed)
    log.info("manifest: %d files, %d already done, %d to do", summary.num_files, stats.skipped_files, todo)

    if todo and not ray.is_initialized():
        _init_ray(settings)
    timeline["ray_ready"] = time.perf_counter() - t0
    stats.timeline = timeline
    prog = Progress(stats, progress, progress_stream, progress_every)
    try:
        if todo:
            _execute(normalized, settings, summary, stats, writer, prog)
    finally:
        prog.close()
    stats.wall_s = time.perf_counter() - t0
    timeline["written"] = stats.wall_s
    timeline.update({k: v - t0 for k, v in stats.timeline.items() if k in ("first_result", "last_result")})
    stats.output_other = check_committed(normalized, summary, recover(layout), "run")
    _tally_output(out, stats)
    write_run_json(layout, {**_run_info(manifest, out, settings, stats), "engine": engine})
    mark_success(layout)
    return stats


def prepare_output(layout: OutputLayout, manifest: str, globs: tuple[str, ...] = (),
                   model_languages: frozenset[str] | None = None, words: bool = False,
                   retry_failed: bool = False) -> tuple[str, ManifestSummary, RunStats, PartWriter, int]:
    """What ``run`` and ``plan`` do in ``out`` before any work: recover from an interrupted run, validate and
    normalize the manifest less the files already done (with ``retry_failed``, failed files of this manifest
    are not done: their rows are dropped, :func:`~krasr_batch.output.drop_failed`), and take ``_SUCCESS``
    away when there is work (the folder is complete again only when these files are in). Returns (the
    normalized manifest's path, its summary, the run's counts, the part writer, how many files are to do)."""
    done = recover(layout)
    failed = _failed_ids(layout.out) if retry_failed and done else set()
    normalized = join(layout.work, "manifest.parquet")
    summary = _normalize(manifest, normalized, done - failed, globs, model_languages)
    if done:
        summary.adopt(open_output(layout.out).files_schema, manifest)
    if summary.num_warned:  # said before the work, and kept in each file's row
        log.warning("%d file(s) of the manifest came with a warning, in their files/ rows too; the first: %s",
                    summary.num_warned, summary.first_warning)
    retried = drop_failed(layout, failed & _ids_in(normalized)) if failed else []
    stats = RunStats(total_files=summary.num_files, skipped_files=summary.num_skipped, retried_files=len(retried))
    writer = PartWriter(layout, files_schema(summary.extra_schema()), words=words)
    todo = summary.num_files - summary.num_skipped
    if todo:
        unmark_success(layout)
    return normalized, summary, stats, writer, todo


def _failed_ids(out: str) -> set[str]:
    rows = open_output(out).files_table(["file_id", "status"])
    return set(rows.filter(pc.equal(rows.column("status"), "error")).column("file_id").to_pylist())


def _ids_in(normalized: str) -> set[str]:
    """The file ids of a normalized manifest (the files a run is to do)."""
    fs, p = filesystem(normalized)
    with fs.open_input_file(p) as f:
        return set(pq.read_table(f, columns=["file_id"]).column(0).to_pylist())


def _normalize(manifest: str, normalized: str, done: set[str], globs: tuple[str, ...] = (),
               model_languages: frozenset[str] | None = None) -> ManifestSummary:
    """Validate the manifest and write it, less the ``done`` files, as Parquet at ``normalized``."""
    local_norm = None if is_uri(normalized) else normalized
    if local_norm is None:
        import tempfile

        local_norm = os.path.join(tempfile.mkdtemp(prefix="krasr-"), "manifest.parquet")
    summary = normalize_manifest(manifest, local_norm, skip_ids=done, globs=globs, model_languages=model_languages)
    if local_norm != normalized:
        from krasr_batch.storage import upload_file

        upload_file(local_norm, normalized)  # streamed; the object appears whole or not at all
        shutil.rmtree(os.path.dirname(local_norm), ignore_errors=True)
    return summary


def check_committed(normalized: str, summary: ManifestSummary, committed: set[str], what: str) -> int:
    """Raise RunAborted unless every file of this manifest is in ``committed`` (the ids in ``files/``); return
    how many committed files are not in this manifest (an earlier run's, with another manifest).

    The ``normalized`` manifest holds the files this run had to do; the rest were in ``committed`` already."""
    missing = sorted(_ids_in(normalized) - committed)
    if missing:
        shown = ", ".join(missing[:5]) + (f", … ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise RunAborted(f"the {what} ended with {len(missing)} of the manifest's {summary.num_files} files "
                         f"not committed: {shown}; rerun the same command to do them")
    return len(committed) - summary.num_files


def _run_info(manifest: str, out: str, settings: RunSettings, stats: RunStats) -> dict[str, Any]:
    """What run.json records: the model, every setting, versions, counts, audio and wall seconds."""
    return {
        "manifest": manifest, "out": out, "model": settings.decode.model, "settings": settings.to_dict(),
        "token_limit": {"policy": settings.decode.token_limit,
                        "card_table": "<=5 s: 40, <=10 s: 64, <=15 s: 80, <=20 s: 96, <=25 s: 112, longer: 128",
                        "fit_tokens_per_s": FIT_TOKENS_PER_S},
        "versions": _versions(),
        "counts": {"files": stats.total_files, "files_this_run": stats.files_done, "skipped_done": stats.skipped_files,
                   "retried_failed": stats.retried_files,
                   "ok": stats.files_ok, "failed": stats.files_failed, "segments": stats.segments,
                   "truncated_segments": stats.truncated_segments, "truncated_by_cause": stats.truncated_by_cause,
                   "clips_past_card_limit": stats.clips_past_card_limit,
                   "suspect_segments": stats.suspect_segments,
                   "warnings_by_kind": {k: len(v) for k, v in stats.warnings_by_kind.items()}},
        "output": {"ok": stats.output_ok, "failed": stats.output_failed, "not_in_manifest": stats.output_other,
                   "failures_by_kind": {k: len(v) for k, v in stats.output_failures_by_kind.items()}},
        "replicas": stats.replicas,  # model replicas this run started (0: it had nothing to decode)
        "passes": stats.passes,  # Ray Data executions, one per --pass-files files (replicas started anew each)
        "audio_s": stats.audio_s, "speech_s": stats.speech_s, "wall_s": stats.wall_s, "rtfx": stats.rtfx,
        # where the wall time went (benchmarks/run_profile.py reads it): seconds from the start to each step,
        # and the seconds replicas spent in model calls and tasks in decoding and segmenting audio
        "profile": {"timeline_s": {k: round(v, 3) for k, v in stats.timeline.items()},
                    "model_s": round(stats.model_s, 3), "segment_s": round(stats.segment_s, 3)},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _tally_output(out: str, stats: RunStats) -> None:
    """Count ok and failed files over the whole ``files/`` table, earlier runs included."""
    try:
        rows = open_output(out).files_table(["file_id", "status", "error_kind"]).to_pylist()
    except OutputError:  # an empty manifest: nothing was committed
        rows = []
    stats.output_ok += sum(1 for r in rows if r["status"] == "ok")
    stats.output_failed += len(rows) - sum(1 for r in rows if r["status"] == "ok")
    failures_by_kind(rows, into=stats.output_failures_by_kind)


def _read_manifest(normalized: str, groups: list | None = None):
    """The normalized manifest as a Ray Dataset, read by the driver and handed over as blocks.

    The driver wrote the file, so it can read it, local or URI, wherever the cluster runs. ``from_blocks``
    runs no task. Ray Data's ``read_parquet`` would plan a ``ListFiles`` task with Ray's default of one
    whole CPU, which takes no resource arguments: on a node whose CPUs the model actors hold but for a
    fraction (2 CPUs, 0.65 free) it never starts and the run waits forever (seen with Ray 2.60).
    ``from_arrow_refs`` would run a whole-CPU task per row group to read its metadata. ``groups``: the file's
    row groups when the caller has read them already (:func:`_manifest_groups`).
    """
    import ray

    groups = _manifest_groups(normalized) if groups is None else groups
    if hasattr(ray.data, "from_blocks"):
        return ray.data.from_blocks(groups)
    return ray.data.from_arrow_refs([ray.put(g) for g in groups])


def _manifest_groups(normalized: str) -> list:
    """The normalized manifest's row groups, as Arrow tables (read once by the driver)."""
    import pyarrow.parquet as pq

    fs, p = filesystem(normalized)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        return [pf.read_row_group(i) for i in range(pf.num_row_groups)]


def _passes(groups: list, size: int) -> Iterator[list]:
    """The manifest's row groups (Arrow tables) cut into consecutive passes of at most ``size`` files.

    Each pass is one Ray Data execution, run after the one before. Within an execution Ray Data keeps
    state for every block it made until the execution ends (the statistics of each output block, the
    blocks a fast stage has made ahead of a slow one), and the driver's memory grows with it: about 27 KB a
    file measured over the first 5,400 files of a million-file run. Passes bound that growth; the price is
    the model replicas' start and the pipeline's fill and drain once a pass. A pass's rows are copied
    out of the row group (one pass at a time), so only they travel to the object store.
    """
    import pyarrow as pa

    current: list = []
    room = size
    for g in groups:
        start = 0
        while start < g.num_rows:
            take = min(room, g.num_rows - start)
            part = g if take == g.num_rows else g.take(pa.array(range(start, start + take)))
            current.append(part)
            start += take
            room -= take
            if room == 0:
                yield current
                current, room = [], size
    if current:
        yield current


def _sized(ds, num_cpus: float):
    """``ds`` with its last operator (a ``repartition``) running at most ``REPARTITION_TASKS`` tasks at once,
    each asking Ray for ``num_cpus``.

    Ray Data's ``repartition`` takes no ``ray_remote_args`` and runs its tasks with Ray Data's default of
    one whole CPU: on nodes whose CPUs the model actors hold but for a fraction, such a task never starts
    and the run waits forever. Nor does it take a concurrency cap, and its tasks can be long-lived: one task
    re-slices a 50,000-file row group of the manifest into 12,500 blocks, pausing whenever the stage after
    it has not taken its output. With 20 row groups (a million files) Ray Data started five such tasks on
    2 CPUs, their CPU shares took the room left for a decode-and-segment task, that stage could never start,
    and the repartition tasks waited for it: no file was ever decoded. One task at a time is what the
    placement keeps room for (``cluster.plan_placement``). The logical operator keeps the arguments and the
    compute strategy it is planned with.
    """
    import ray

    op = ds._logical_plan.dag
    args = getattr(op, "ray_remote_args", None)
    if not isinstance(args, dict) or not hasattr(op, "compute"):
        raise RuntimeError(f"cannot size Ray Data's {type(op).__name__} tasks with this Ray version")
    args["num_cpus"] = num_cpus
    object.__setattr__(op, "compute", ray.data.TaskPoolStrategy(size=REPARTITION_TASKS))  # a frozen dataclass (Ray 2.60)
    return ds


def cpu_replica_bytes(dec) -> int | None:
    """A CPU replica's peak memory for this run's model, engine, batch and beams
    (``engines.base.replica_memory_bytes``), or None where the model's config cannot be read here: the
    placement then holds one replica per CPU as before."""
    from krasr_batch.engines.base import default_batch_size, model_config, replica_memory_bytes
    from krasr_batch.engines.encoder import cpu_compute_type

    dtype = cpu_compute_type() if dec.dtype == "auto" else dec.dtype
    try:
        config = model_config(dec.model)
        return replica_memory_bytes(config, dec.engine, default_batch_size(dec.batch_size, "cpu", dec.engine),
                                    dec.beams, dtype)
    except Exception as e:  # noqa: BLE001 - a hub id offline, a config of another shape: the CPU count decides
        log.info("no replica memory estimate for %s (%s): one replica per CPU", dec.model, e)
        return None


def block_rows(dec, use_gpu: bool) -> int:
    """Segments per model-stage block (one ``map_batches`` call on a replica).

    A replica groups a block's segments into model batches of one token limit and one language. On a GPU a
    block holds four batches, so that batches fill. On CPUs a block is one batch: there are several
    replicas, and a larger block would leave the others idle at the end of a small job (CTranslate2 gains
    from full batches, transformers decodes one segment at a time and gets blocks of two).
    """
    from krasr_batch.engines.base import default_batch_size

    per_call = default_batch_size(dec.batch_size, "cuda" if use_gpu else "cpu", dec.engine)
    return per_call * 4 if use_gpu else max(per_call, 2)


SMALL_JOB_FILES = 256  # manifests up to this size are looked at for how many replicas they can keep busy


def model_blocks_bound(paths: list[str], opts, block: int, input_root: str | None = None) -> int | None:
    """At most how many model-stage blocks of ``block`` rows files at ``paths`` make, from their headers; None
    where a header cannot be read here (a URI, a dataset shard's row, a format soundfile does not read, a
    missing file or one outside ``input_root``: the decode-and-segment tasks report those).

    A file gives one row per window and one file row. A file no longer than ``whole_file_max_s`` is one
    window; a longer one at most ``2 * ceil(duration / max_segment_s) + 1`` (``segment.plan_windows``: two
    windows in a row hold more than ``max_segment_s`` of it, or the second could have joined the first).
    Files go to decode-and-segment tasks ``ROWS_PER_SEGMENT_TASK`` at a time, and the repartition into model
    blocks makes at most one short block per task's output (Ray Data's non-strict ``repartition``).
    """
    import math

    import soundfile

    from krasr_batch.audio import check_path
    from krasr_batch.shards import parse_ref

    rows: list[int] = []
    for path in paths:
        if is_uri(path) or parse_ref(path) is not None:
            return None
        try:
            check_path(path, input_root)  # nothing outside --input-root is opened, not even for its header
            duration = soundfile.info(path).duration
        except Exception:  # noqa: BLE001 - any file soundfile cannot describe: no bound
            return None
        whole = duration <= opts.whole_file_max_s
        rows.append(1 + (1 if whole else 2 * math.ceil(duration / opts.max_segment_s) + 1))
    tasks = [rows[i:i + ROWS_PER_SEGMENT_TASK] for i in range(0, len(rows), ROWS_PER_SEGMENT_TASK)]
    return sum(math.ceil(sum(t) / block) for t in tasks)


def blocks_in_flight(use_gpu: bool) -> int:
    """Blocks Ray Data may hand one model replica before it has finished the one it is decoding.

    A GPU replica gets two, so the next block is already in its process when a batch ends and the GPU never
    waits on a transfer. A CPU replica gets one: a block there is a single model call of a minute or more
    (16 windows of long recordings), and a second block queued behind it waits that long while another
    replica may sit idle. Measured on the archive set's long recordings (2 CPU replicas): with two in flight
    one replica decoded 53 windows and the other 30 (73 % busy, 206.7 s); with one, 42 and 41 (87 %, 173.1 s).
    """
    return 2 if use_gpu else 1


def _execute(normalized: str, settings: RunSettings, summary: ManifestSummary, stats: RunStats,
             writer: PartWriter, prog: Progress) -> None:
    import ray

    from krasr_batch.cluster import plan_placement

    res = settings.resources
    cluster = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    dec = settings.decode
    groups = _manifest_groups(normalized)
    bound = None
    if not res.actors and not res.address and summary.num_files <= SMALL_JOB_FILES:
        # a small local job: no CPU replica that could get no block to decode (plan_placement's work_bound;
        # a GPU run ignores it: one replica per GPU). Reading up to SMALL_JOB_FILES headers costs milliseconds.
        paths = [p for g in groups for p in g.column("path").to_pylist()]
        bound = model_blocks_bound(paths, settings.segment, block_rows(dec, False), res.input_root)
    replica = None if res.actors else cpu_replica_bytes(dec)
    place = plan_placement(nodes, res.device, res.actors, res.actor_resource, work_bound=bound,
                           replica_bytes=replica)
    use_gpu, actors, stage_res, threads = place.use_gpu, place.actors, place.ray_args, place.threads
    if use_gpu and not cluster.get("GPU") and not res.address:  # no autoscaler to bring one: fail, don't wait
        raise RunAborted("--device cuda, but Ray sees no GPU on this machine (is CUDA's torch installed?)")
    batch = block_rows(dec, use_gpu)
    stats.replicas = actors
    log.info("cluster: %d node(s), %d CPUs, %d GPUs; %s%s%s", len(nodes), cluster.get("CPU", 0),
             cluster.get("GPU", 0), place.describe(), "" if bound is None or use_gpu else f" (at most {bound} model blocks)",
             "" if replica is None or use_gpu else f" (a replica up to {replica / 2**30:.1f} GiB)")
    if place.problem:
        log.warning("placement: %s (%s)", place.problem, place.describe())

    stage = model_stage_class(dec, "cuda" if use_gpu else "cpu", threads)
    in_flight = blocks_in_flight(use_gpu)

    def graph(part: list):
        ds = _read_manifest(normalized, part)
        ds = _sized(ds.repartition(target_num_rows_per_block=ROWS_PER_SEGMENT_TASK), place.repartition_cpus)
        ds = ds.flat_map(segment_file, fn_kwargs=dict(
            segment_options=settings.segment, default_language=dec.language,
            input_root=res.input_root, token_limit=dec.token_limit), num_cpus=place.segment_cpus)
        # blocks of one model batch (four on a GPU), handed to whichever replica is free (see
        # blocks_in_flight): a long recording's segments, or the first blocks that arrive while other
        # replicas still load, spread over every actor instead of queueing behind one
        ds = _sized(ds.repartition(target_num_rows_per_block=batch), place.repartition_cpus)
        return ds.map_batches(stage, batch_size=batch, batch_format="pyarrow",
                              compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight),
                              **stage_res)

    _drain_passes(groups, graph, Assembler(summary, stats), stats, writer, prog, settings)


def _drain_passes(groups: list, graph, asm: Assembler, stats: RunStats, writer: PartWriter, prog: Progress,
                  settings: RunSettings) -> None:
    """Drain ``graph(part)`` (a Ray Dataset over a pass's row groups) for each pass of ``groups`` in turn
    (:func:`_passes`), into one ``asm`` (``run`` and ``plan``); ``stats`` counts the passes."""
    import ray

    ctx = ray.data.DataContext.get_current()  # no progress bars or start banner of Ray Data's own
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    size = settings.resources.pass_files
    stats.passes_planned = -(-sum(g.num_rows for g in groups) // size)
    for part in _passes(groups, size):
        stats.passes += 1
        if stats.passes_planned > 1:
            log.info("pass %d of %d: %d files", stats.passes, stats.passes_planned, sum(g.num_rows for g in part))
        ds = graph(part)
        _drain(ds, asm, stats, writer, prog, settings)
        del ds  # the execution's state (Ray Data keeps some per block until the dataset goes) goes with it


def _drain(ds, asm: Assembler, stats: RunStats, writer: PartWriter, prog: Progress, settings: RunSettings) -> None:
    """Pull the pipeline's rows on the driver, assemble whole files and commit them (``run`` and ``plan``)."""
    res = settings.resources
    watch = StallWatch(res.stall_timeout_s, res.actor_resource)
    last_flush = time.perf_counter()
    feed = Feed(ds)
    try:
        for b in feed:
            now = time.perf_counter()
            if b is not None:
                stats.timeline.setdefault("first_result", now)
                stats.timeline["last_result"] = now
                asm.add(b)
                watch.progress(now)
                if len(asm.ready_files) >= res.flush_files or (asm.ready_files and now - last_flush >= res.flush_s):
                    stats.files_committed += writer.write(*asm.take())
                    last_flush = now
                check_failures(stats, res.max_failed_fraction, res.min_files_for_failure_check)
            prog.notice = watch.check(now)
            prog.update()
    except BaseException as e:
        try:  # what finished is committed first: a scheduler's SIGKILL may follow its SIGTERM within seconds
            stats.files_committed += writer.write(*asm.take())
        finally:
            feed.abandon(0.0 if isinstance(e, RunStalled) else 10.0)  # a stalled feed brings nothing more
        raise
    finally:
        feed.stop()
        stats.files_committed += writer.write(*asm.take())  # what finished is kept, also when the run stops early
    if asm.pending:
        raise RunAborted(f"{asm.pending} file(s) did not come back complete from the pipeline")
