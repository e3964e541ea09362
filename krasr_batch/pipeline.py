"""The Ray Data graph: manifest → decode-and-segment tasks (CPU) → model actors (GPU or CPU) → Parquet parts.

    read_parquet(normalized manifest)          one row per file
      .repartition(target_num_rows_per_block)  small blocks, so many files are segmented at once
      .flat_map(segment_file)                  CPU tasks: decode, VAD, cut; one row per segment + one per file
      .map_batches(ModelStage, concurrency=N)  actor pool, one model replica per actor (num_gpus=1 on GPUs)
      .iter_batches() on the driver            assemble finished files, commit them as Parquet parts

The driver commits a file only when all of its segments are back (see sink.py for the protocol), which
is what lets a rerun skip finished files and never double a row.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from krasr_batch import __version__
from krasr_batch.audio import SAMPLE_RATE, AudioError, check_path
from krasr_batch.engines import FIT_TOKENS_PER_S, SegmentInput, check_model, load_decoder, segment_token_limit
from krasr_batch.manifest import ManifestSummary, convert_extra, normalize_manifest
from krasr_batch.quality import compression_ratio, truncation_cause
from krasr_batch.quality import suspect as is_suspect
from krasr_batch.segment import analyse, segment_audio
from krasr_batch.settings import DecodeOptions, RunSettings, SegmentOptions
from krasr_batch.sink import (
    OutputLayout,
    PartWriter,
    clear_output,
    files_schema,
    mark_success,
    read_text,
    recover,
    write_bytes_atomic,
    write_run_json,
)
from krasr_batch.storage import filesystem, join

log = logging.getLogger(__name__)

ROWS_PER_SEGMENT_TASK = 4  # files per decode-and-segment block


class SettingsMismatch(RuntimeError):
    pass


class ModelUnavailable(RuntimeError):
    """--model cannot be loaded (or converted) here."""


class RunAborted(RuntimeError):
    pass


# ---------------------------------------------------------------- stage 1: decode and segment (CPU tasks)

def _file_fields(row: dict, language: str | None) -> dict[str, Any]:
    return {
        "file_id": row["file_id"], "path": row["path"], "line": int(row["line"]), "req_language": language or "auto",
        "reference_text": row["reference_text"], "extra_json": row["extra_json"],
    }


def segment_file(row: dict, segment_options: SegmentOptions, default_language: str,
                 input_root: str | None, token_limit: str) -> Iterator[dict]:
    """One manifest row in; its segments (with audio) out, then one file row (segment_index -1).

    Never raises for a bad file: the file row carries status "error" and the cause.
    """
    t0 = time.perf_counter()
    language = row["language"] or default_language
    language = None if language == "auto" else language
    base = _file_fields(row, language)
    info = {"status": "ok", "error": None, "error_kind": None, "warning": None, "duration_s": None,
            "speech_s": None, "num_segments": 0}
    n = 0
    try:
        check_path(row["path"], input_root)
        plan = analyse(row["path"], segment_options)
        info.update(duration_s=plan.duration_s, speech_s=plan.speech_s, num_segments=len(plan.segments),
                    warning="; ".join(plan.warnings) or None)
        for (s, e), audio in zip(plan.segments, segment_audio(plan)):
            dur = (e - s) / SAMPLE_RATE
            yield {**base, **info, "segment_index": n, "start_s": s / SAMPLE_RATE, "end_s": e / SAMPLE_RATE,
                   "max_new_tokens": segment_token_limit(dur, plan.whole_file, token_limit),
                   "audio": np.ascontiguousarray(audio, np.float32).tobytes(), "segment_wall_s": 0.0}
            n += 1
        if n != len(plan.segments):
            raise AudioError("decode_mismatch", f"second decoding pass of {row['path']} gave {n} of "
                                                f"{len(plan.segments)} segments")
    except AudioError as e:
        info.update(status="error", error=str(e), error_kind=e.kind, num_segments=n)
    except Exception as e:  # noqa: BLE001 - one file must never stop the job
        log.exception("unexpected failure on %s", row["path"])
        info.update(status="error", error=f"{type(e).__name__}: {e}", error_kind="internal", num_segments=n)
    yield {**base, **info, "segment_index": -1, "start_s": 0.0, "end_s": 0.0, "max_new_tokens": 0,
           "audio": b"", "segment_wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- stage 2: the model (actor pool)

class ModelStage:
    """Ray Data callable class: one model replica per actor; decodes the segment rows of each batch."""

    def __init__(self, options: DecodeOptions, device: str = "auto", threads: int | None = None):
        self.decoder = load_decoder(options, device, threads)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{self.decoder.device}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = {name: batch.column(name).to_pylist() for name in batch.column_names if name != "audio"}
        n = batch.num_rows
        seg_index = cols["segment_index"]
        idx = [i for i in range(n) if seg_index[i] >= 0]
        text: list[str | None] = [None] * n
        out_lang: list[str | None] = [None] * n
        num_tokens, truncated, decode_s, batch_size = [0] * n, [False] * n, [0.0] * n, [0] * n
        avg_logprob: list[float | None] = [None] * n
        no_speech_prob: list[float | None] = [None] * n
        ratio: list[float | None] = [None] * n
        suspect: list[bool | None] = [None] * n
        truncation: list[str | None] = [None] * n
        limits = cols["max_new_tokens"]  # set per segment by segment_file (decode.segment_token_limit)
        if idx:
            audio = batch.column("audio")
            inputs = []
            for i in idx:
                lang = cols["req_language"][i]
                inputs.append(SegmentInput(np.frombuffer(audio[i].as_py(), np.float32),
                                           None if lang == "auto" else lang, limits[i]))
            for i, r in zip(idx, self.decoder.decode(inputs)):
                text[i], out_lang[i], num_tokens[i], truncated[i] = r.text, r.language, r.num_tokens, r.truncated
                decode_s[i], batch_size[i] = r.decode_s, r.batch_size
                avg_logprob[i], no_speech_prob[i] = r.avg_logprob, r.no_speech_prob
                ratio[i] = compression_ratio(r.text) if r.text else 0.0
                suspect[i] = is_suspect(r.text, cols["end_s"][i] - cols["start_s"][i], r.avg_logprob, r.no_speech_prob)
                truncation[i] = truncation_cause(r.text, r.truncated)
        cols.update(text=text, out_language=out_lang, num_tokens=num_tokens, truncated=truncated,
                    decode_s=decode_s, batch_size=batch_size, max_new_tokens=limits, worker=[self.worker] * n,
                    avg_logprob=avg_logprob, compression_ratio=ratio, no_speech_prob=no_speech_prob, suspect=suspect,
                    truncation=truncation)
        return pa.table({f.name: pa.array(cols[f.name], f.type) for f in STAGE_OUTPUT_SCHEMA}, schema=STAGE_OUTPUT_SCHEMA)


def model_stage_class(options: DecodeOptions, device: str, threads: int | None) -> type:
    """ModelStage with its settings bound into the class itself.

    The settings travel with the class definition rather than as constructor arguments in the object
    store, so Ray can always restart a killed actor (ray-project/ray#53727).
    """

    class BoundModelStage(ModelStage):
        def __init__(self) -> None:
            super().__init__(options, device, threads)

    BoundModelStage.__name__ = BoundModelStage.__qualname__ = "ModelStage"
    return BoundModelStage


STAGE_OUTPUT_SCHEMA = pa.schema([
    ("file_id", pa.string()), ("path", pa.string()), ("line", pa.int64()), ("req_language", pa.string()),
    ("reference_text", pa.string()), ("extra_json", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("error_kind", pa.string()), ("warning", pa.string()), ("duration_s", pa.float64()), ("speech_s", pa.float64()),
    ("num_segments", pa.int64()), ("segment_index", pa.int64()), ("start_s", pa.float64()), ("end_s", pa.float64()),
    ("max_new_tokens", pa.int64()), ("segment_wall_s", pa.float64()), ("text", pa.string()),
    ("out_language", pa.string()), ("num_tokens", pa.int64()), ("truncated", pa.bool_()), ("decode_s", pa.float64()),
    ("batch_size", pa.int64()), ("worker", pa.string()), ("avg_logprob", pa.float64()),
    ("compression_ratio", pa.float64()), ("no_speech_prob", pa.float64()), ("suspect", pa.bool_()),
    ("truncation", pa.string()),
])


# ---------------------------------------------------------------- driver: assembly, progress, commit

@dataclass
class RunStats:
    total_files: int = 0
    skipped_files: int = 0  # done by an earlier run
    files_done: int = 0  # decoded and assembled in this run
    files_committed: int = 0  # of those, written to files/
    files_ok: int = 0
    files_failed: int = 0
    failures_by_kind: dict[str, list[str]] = field(default_factory=dict)
    audio_s: float = 0.0
    speech_s: float = 0.0
    segments: int = 0
    truncated_segments: int = 0
    truncated_by_cause: dict[str, int] = field(default_factory=dict)  # quality.TRUNCATION_CAUSES
    suspect_segments: int = 0
    decode_s: float = 0.0
    wall_s: float = 0.0
    # the whole output, earlier runs included (what the exit status and the summary's failures describe)
    output_ok: int = 0
    output_failed: int = 0
    output_failures_by_kind: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rtfx(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


class Progress:
    """One status line: files, audio hours, RTFx (audio seconds per wall second) and an ETA."""

    def __init__(self, stats: RunStats, enabled: bool, stream=None, every_s: float = 2.0):
        self.stats, self.enabled, self.stream = stats, enabled, stream or sys.stderr
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.notice: str | None = None  # e.g. what Ray cannot place, shown after the counts

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
                + (f"  {self.notice}" if self.notice else ""))

    def update(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if force or now - self.last >= self.every_s:
            self.last = now
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


class Assembler:
    """Collects segment and file rows as they stream back; hands over files whose segments are all in."""

    def __init__(self, summary: ManifestSummary, stats: RunStats):
        self.summary = summary
        self.stats = stats
        self.segments: dict[str, list[dict]] = {}
        self.file_rows: dict[str, dict] = {}
        self.ready_segments: list[dict] = []
        self.ready_files: list[dict] = []

    def add(self, batch: pa.Table) -> None:
        n = batch.num_rows
        cols = {name: batch.column(name).to_pylist() for name in batch.column_names}
        for i in range(n):
            fid = cols["file_id"][i]
            if cols["segment_index"][i] >= 0:
                self.segments.setdefault(fid, []).append({
                    "file_id": fid, "path": cols["path"][i], "segment_index": cols["segment_index"][i],
                    "start_s": cols["start_s"][i], "end_s": cols["end_s"][i], "text": cols["text"][i],
                    "language": cols["out_language"][i], "max_new_tokens": cols["max_new_tokens"][i],
                    "num_tokens": cols["num_tokens"][i], "truncated": cols["truncated"][i],
                    "decode_s": cols["decode_s"][i], "batch_size": cols["batch_size"][i], "worker": cols["worker"][i],
                    "avg_logprob": cols["avg_logprob"][i], "compression_ratio": cols["compression_ratio"][i],
                    "no_speech_prob": cols["no_speech_prob"][i], "suspect": cols["suspect"][i],
                    "truncation": cols["truncation"][i],
                })
            else:
                self.file_rows[fid] = {k: cols[k][i] for k in cols}
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
        segs.sort(key=lambda r: r["segment_index"])
        extra = json.loads(row["extra_json"]) if row["extra_json"] else {}
        file_row = {
            "file_id": fid, "path": row["path"], "status": row["status"], "error": row["error"],
            "error_kind": row["error_kind"], "warning": row["warning"], "duration_s": row["duration_s"],
            "speech_s": row["speech_s"], "num_segments": len(segs),
            "text": " ".join(s["text"] for s in segs if s["text"]) if row["status"] == "ok" else None,
            "reference_text": row["reference_text"], "language": row["req_language"],
            "segment_wall_s": row["segment_wall_s"],
        }
        for k, t in self.summary.extra_types.items():
            file_row[k] = convert_extra(extra.get(k), t)
        self.ready_segments.extend(segs)
        self.ready_files.append(file_row)
        st = self.stats
        st.files_done += 1
        if row["status"] == "ok":
            st.files_ok += 1
            st.audio_s += row["duration_s"] or 0.0
            st.speech_s += row["speech_s"] or 0.0
        else:
            st.files_failed += 1
            st.failures_by_kind.setdefault(row["error_kind"] or "error", []).append(fid)
        st.segments += len(segs)
        st.truncated_segments += sum(1 for s in segs if s["truncated"])
        for s in segs:
            if s["truncation"]:
                st.truncated_by_cause[s["truncation"]] = st.truncated_by_cause.get(s["truncation"], 0) + 1
        st.suspect_segments += sum(1 for s in segs if s["suspect"])
        st.decode_s += sum(s["decode_s"] for s in segs)

    def take(self) -> tuple[list[dict], list[dict]]:
        segs, files = self.ready_segments, self.ready_files
        self.ready_segments, self.ready_files = [], []
        return segs, files

    @property
    def pending(self) -> int:
        return len(self.file_rows) + len(self.segments)


# ---------------------------------------------------------------- the run

def _init_ray(settings: RunSettings):
    import ray

    if ray.is_initialized():
        return False
    res = settings.resources
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if res.address:
        from krasr_batch.cluster import auth_refused, driver_runtime_env, is_auth_failure, use_cluster_token

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
        ray.init(num_cpus=res.num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", **kwargs)
    return True


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


def _check_settings(layout: OutputLayout, settings: RunSettings, manifest: str, overwrite: bool) -> None:
    fingerprint = settings.output_fingerprint()
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
    fs.create_dir(p, recursive=True)
    write_bytes_atomic(json.dumps({"fingerprint": fingerprint, "manifest": manifest,
                                   "settings": settings.to_dict()}, indent=2).encode(), stamp_path)


def run(manifest: str, out: str, settings: RunSettings, overwrite: bool = False, progress: bool = True,
        progress_stream=None) -> RunStats:
    """Transcribe every file of ``manifest`` into ``out``; returns the run's statistics.

    Raises ModelUnavailable (local runs) or ManifestError before any work for a model that does not load or a
    bad manifest, SettingsMismatch for an ``out`` made with other settings, RunAborted when too many files fail.
    """
    import ray

    t0 = time.perf_counter()
    if not settings.resources.address:  # on a cluster the nodes load the model; here it must load before any work
        try:
            check_model(settings.decode)
        except RuntimeError as e:
            raise ModelUnavailable(str(e)) from e
    layout = OutputLayout(out)
    _check_settings(layout, settings, manifest, overwrite)
    done = recover(layout)
    normalized = join(layout.work, "manifest.parquet")
    local_norm = normalized if "://" not in normalized else None
    if local_norm is None:
        import tempfile

        local_norm = os.path.join(tempfile.mkdtemp(prefix="krasr-"), "manifest.parquet")
    summary = normalize_manifest(manifest, local_norm, skip_ids=done)
    if local_norm != normalized:
        from krasr_batch.storage import upload_file

        upload_file(local_norm, normalized)  # streamed; the object appears whole or not at all
        shutil.rmtree(os.path.dirname(local_norm), ignore_errors=True)
    stats = RunStats(total_files=summary.num_files, skipped_files=min(len(done), summary.num_files))
    writer = PartWriter(layout, files_schema(summary.extra_schema()))
    todo = summary.num_files - stats.skipped_files
    log.info("manifest: %d files, %d already done, %d to do", summary.num_files, stats.skipped_files, todo)

    started_ray = _init_ray(settings) if todo else False
    prog = Progress(stats, progress, progress_stream)
    try:
        if todo:
            _execute(normalized, settings, summary, stats, writer, prog)
    finally:
        prog.close()
        if started_ray:
            ray.shutdown()
    stats.wall_s = time.perf_counter() - t0
    final_ids = recover(layout)
    if len(final_ids) != summary.num_files:
        raise RunAborted(f"the run ended with {len(final_ids)} of {summary.num_files} files committed")
    _tally_output(layout, stats)
    write_run_json(layout, {
        "manifest": manifest, "out": out, "model": settings.decode.model, "settings": settings.to_dict(),
        "token_limit": {"policy": settings.decode.token_limit,
                        "card_table": "<=5 s: 40, <=10 s: 64, <=15 s: 80, <=20 s: 96, <=25 s: 112, longer: 128",
                        "fit_tokens_per_s": FIT_TOKENS_PER_S},
        "versions": _versions(),
        "counts": {"files": stats.total_files, "files_this_run": stats.files_done, "skipped_done": stats.skipped_files,
                   "ok": stats.files_ok, "failed": stats.files_failed, "segments": stats.segments,
                   "truncated_segments": stats.truncated_segments, "truncated_by_cause": stats.truncated_by_cause,
                   "suspect_segments": stats.suspect_segments},
        "output": {"ok": stats.output_ok, "failed": stats.output_failed,
                   "failures_by_kind": {k: len(v) for k, v in stats.output_failures_by_kind.items()}},
        "audio_s": stats.audio_s, "speech_s": stats.speech_s, "wall_s": stats.wall_s, "rtfx": stats.rtfx,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    mark_success(layout)
    return stats


def _tally_output(layout: OutputLayout, stats: RunStats) -> None:
    """Count ok and failed files over the whole ``files/`` table, earlier runs included."""
    import pyarrow.dataset as pads

    fs, p = filesystem(layout.files)
    t = pads.dataset(p, filesystem=fs, format="parquet").to_table(columns=["file_id", "status", "error_kind"])
    for fid, status, kind in zip(*(t.column(c).to_pylist() for c in ("file_id", "status", "error_kind"))):
        if status == "ok":
            stats.output_ok += 1
        else:
            stats.output_failed += 1
            stats.output_failures_by_kind.setdefault(kind or "error", []).append(fid)


def _read_manifest(normalized: str):
    """The normalized manifest as a Ray Dataset, read by the driver and handed over as blocks.

    The driver wrote the file, so it can read it, local or URI, wherever the cluster runs. ``from_blocks``
    runs no task. Ray Data's ``read_parquet`` would plan a ``ListFiles`` task with Ray's default of one
    whole CPU, which takes no resource arguments: on a node whose CPUs the model actors hold but for a
    fraction (2 CPUs, 0.65 free) it never starts and the run waits forever (seen with Ray 2.60).
    ``from_arrow_refs`` would run a whole-CPU task per row group to read its metadata.
    """
    import pyarrow.parquet as pq
    import ray

    fs, p = filesystem(normalized)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        groups = [pf.read_row_group(i) for i in range(pf.num_row_groups)]
    if hasattr(ray.data, "from_blocks"):
        return ray.data.from_blocks(groups)
    return ray.data.from_arrow_refs([ray.put(g) for g in groups])


def _sized(ds, num_cpus: float):
    """``ds`` with its last operator's tasks asking Ray for ``num_cpus``.

    Ray Data's ``repartition`` takes no ``ray_remote_args`` and runs its tasks with Ray Data's default of
    one whole CPU: on nodes whose CPUs the model actors hold but for a fraction, such a task never starts
    and the run waits forever. Its logical operator keeps the arguments it is planned with.
    """
    op = ds._logical_plan.dag
    args = getattr(op, "ray_remote_args", None)
    if not isinstance(args, dict):
        raise RuntimeError(f"cannot size Ray Data's {type(op).__name__} tasks with this Ray version")
    args["num_cpus"] = num_cpus
    return ds


def _execute(normalized: str, settings: RunSettings, summary: ManifestSummary, stats: RunStats,
             writer: PartWriter, prog: Progress) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    from krasr_batch.cluster import plan_placement

    res = settings.resources
    cluster = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    place = plan_placement(nodes, res.device, res.actors, res.actor_resource)
    use_gpu, actors, stage_res, threads = place.use_gpu, place.actors, place.ray_args, place.threads
    if use_gpu and not cluster.get("GPU") and not res.address:  # no autoscaler to bring one: fail, don't wait
        raise RunAborted("--device cuda, but Ray sees no GPU on this machine (is CUDA's torch installed?)")
    dec = settings.decode
    batch = (dec.batch_size or 16) * 4 if use_gpu else (dec.batch_size or 1) * 2
    log.info("cluster: %d node(s), %d CPUs, %d GPUs; %s", len(nodes), cluster.get("CPU", 0),
             cluster.get("GPU", 0), place.describe())
    if place.problem:
        log.warning("placement: %s (%s)", place.problem, place.describe())

    ds = _read_manifest(normalized)
    ds = _sized(ds.repartition(target_num_rows_per_block=ROWS_PER_SEGMENT_TASK), place.repartition_cpus)
    ds = ds.flat_map(segment_file, fn_kwargs=dict(
        segment_options=settings.segment, default_language=dec.language,
        input_root=res.input_root, token_limit=dec.token_limit), num_cpus=place.segment_cpus)
    # blocks of one model batch, and at most two in flight per actor: a long recording's segments, or the
    # first blocks that arrive while other replicas still load, spread over every actor instead of
    # queueing behind one
    ds = _sized(ds.repartition(target_num_rows_per_block=batch), place.repartition_cpus)
    stage = model_stage_class(dec, "cuda" if use_gpu else "cpu", threads)
    ds = ds.map_batches(stage, batch_size=batch, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
                        **stage_res)
    asm = Assembler(summary, stats)
    watch = StallWatch(res.stall_timeout_s, res.actor_resource)
    last_flush = time.perf_counter()
    feed = _Feed(ds)
    try:
        for b in feed:
            now = time.perf_counter()
            if b is not None:
                asm.add(b)
                watch.progress(now)
                if len(asm.ready_files) >= res.flush_files or (asm.ready_files and now - last_flush >= res.flush_s):
                    stats.files_committed += writer.write(*asm.take())
                    last_flush = now
                _check_failures(stats, res.max_failed_fraction, res.min_files_for_failure_check)
            prog.notice = watch.check(now)
            prog.update()
    except BaseException:
        feed.abandon()
        raise
    finally:
        feed.stop()
        stats.files_committed += writer.write(*asm.take())  # what finished is kept, also when the run stops early
    if asm.pending:
        raise RunAborted(f"{asm.pending} file(s) did not come back complete from the pipeline")


class _Feed:
    """The dataset's batches, pulled on a thread of their own; iterating yields a batch, or None each
    ``tick_s`` that none came, so the driver keeps its progress line and stall check alive while Ray waits."""

    def __init__(self, ds, tick_s: float = 1.0):
        import queue
        import threading

        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.tick_s = tick_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._pull, args=(ds,), name="krasr-feed", daemon=True)
        self.thread.start()

    def _pull(self, ds) -> None:
        try:
            for b in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                if not self._put(("batch", b)):
                    return
            self._put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which raises it
            self._put(("error", e))

    def _put(self, item) -> bool:
        import queue

        while not self.stopped.is_set():
            try:
                self.q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        import queue

        while True:
            try:
                kind, value = self.q.get(timeout=self.tick_s)
            except queue.Empty:
                yield None
                continue
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value

    def stop(self) -> None:
        self.stopped.set()

    def abandon(self) -> None:
        """The run stops with Ray Data's executor still waiting (e.g. on an actor that cannot be placed):
        it cannot be closed from here, and once Ray shuts down its thread only logs tracebacks about it."""
        self.stop()
        for name in ("ray.data", "ray._private.services"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class RunStalled(RunAborted):
    """Nothing came back for ``--stall-timeout`` while Ray held requests that no node could place."""


class StallWatch:
    """Tells a slow run from one that can never go on.

    Once nothing has come back for a while, it asks Ray (as ``ray status`` does) for pending requests that
    no alive node has the free resources for. Past ``warn_s`` of both, the progress line names them; past
    ``timeout_s`` (``--stall-timeout``, 0: never), the run stops with what to change. While an autoscaler
    is starting nodes, waiting is expected and nothing is reported.
    """

    WARN_S = 120.0
    POLL_S = 5.0

    def __init__(self, timeout_s: float, actor_resource: str | None, read=None):
        self.timeout_s = timeout_s
        self.warn_s = min(self.WARN_S, timeout_s / 2) if timeout_s > 0 else self.WARN_S
        self.actor_resource = actor_resource
        self.read = read
        self.last_progress = time.perf_counter()
        self.blocked_since: float | None = None
        self.stuck: list = []
        self.free: list[dict[str, float]] = []
        self.last_poll = 0.0

    def progress(self, now: float) -> None:
        self.last_progress = now
        self.blocked_since, self.stuck = None, []

    def _poll(self, now: float) -> None:
        from krasr_batch.cluster import read_cluster_demand, unplaceable

        self.last_poll = now
        state = (self.read or read_cluster_demand)()
        stuck = [] if state is None or state.launching else unplaceable(state.pending, state.free)
        if stuck:
            self.blocked_since = self.blocked_since or now
            self.stuck, self.free = stuck, state.free
        else:
            self.blocked_since, self.stuck = None, []

    def check(self, now: float) -> str | None:
        """The progress line's notice, if any; raises RunStalled past the timeout."""
        quiet = now - self.last_progress
        if quiet < min(self.POLL_S * 2, self.warn_s):
            return None
        if now - self.last_poll >= self.POLL_S:
            self._poll(now)
        if self.blocked_since is None:
            return None
        what = "; ".join(d.describe() for d in self.stuck)
        if self.timeout_s > 0 and quiet >= self.timeout_s and now - self.blocked_since >= self.POLL_S:
            from krasr_batch.cluster import placement_advice

            free = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(nd.items())
                                       if k in ("CPU", "GPU") or not (k.startswith("node:") or "memory" in k))
                             or "nothing" for nd in self.free)
            raise RunStalled(
                f"nothing came back for {_hms(quiet)} and Ray cannot place {what} on any node (free per node: "
                f"{free or 'no node'}). To change: {placement_advice(self.stuck, self.actor_resource)}. "
                f"--stall-timeout {self.timeout_s:g} stopped the run (0 waits forever). Finished files are kept; "
                "rerun the same command to continue.")
        if quiet >= self.warn_s:
            return f"STALLED {_hms(quiet)}: no node has room for {what}"
        return None


def _hms(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def _check_failures(stats: RunStats, max_fraction: float, min_files: int) -> None:
    if stats.files_done >= min_files and stats.files_failed > max_fraction * stats.files_done:
        kinds = ", ".join(f"{k}: {len(v)}" for k, v in sorted(stats.failures_by_kind.items(), key=lambda kv: -len(kv[1])))
        raise RunAborted(
            f"{stats.files_failed} of the first {stats.files_done} files failed "
            f"(more than --max-failed-fraction {max_fraction:g}); causes: {kinds}. Is a mount or bucket missing? "
            "Finished files are kept; rerun the same command to continue.")
