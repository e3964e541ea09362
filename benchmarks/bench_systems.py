"""benchmarks.compare, the systems: each one prepared, run as a whole command in its own process, timed,
and its texts collected."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.baselines import PEER_BATCH_SIZE, ct2_quantization
from benchmarks.bench_measure import GpuSampler

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("krasr", "krasr-tf", "card", "chunked", "faster-whisper")
KRASR_SYSTEMS = ("krasr", "krasr-tf")
LABELS = {
    "krasr": "krasr-batch",
    "krasr-tf": "krasr-batch, transformers engine",
    "card": "card usage (pipeline, file by file)",
    "chunked": f"pipeline chunked + batched (bs {PEER_BATCH_SIZE})",
    "faster-whisper": f"faster-whisper batched (bs {PEER_BATCH_SIZE})",
}
SETTINGS = {
    "krasr": "`krasr-batch run` defaults (--engine auto: on CPUs with bfloat16 units the torch engine in "
             "bfloat16, on other CPUs CTranslate2 with int8 weights; transformers on GPUs; "
             "Silero VAD windows ≤30 s cut at pauses, pauses inside a window shortened to 1 s; token limit "
             "fit: the card's table for a clip decoded whole, 12 tokens/s for windows of long recordings; "
             "batches of 16 segments across files), plus --krasr-args",
    "krasr-tf": "as krasr-batch, with `--engine transformers` last (the card's own generate() call)",
    "card": "transformers pipeline per file; task=transcribe, language per file, num_beams=3, "
            "no_repeat_ngram_size=4, repetition_penalty=1.12, card's duration-based max_new_tokens; "
            "chunk_length_s=30 past 30 s",
    "chunked": f"one pipeline call per language over the file list; chunk_length_s=30, batch_size={PEER_BATCH_SIZE}; "
               "the card's generate settings with max_new_tokens=128",
    "faster-whisper": "BatchedInferencePipeline (Silero VAD chunks ≤30 s, vad_filter default), "
                      f"batch_size={PEER_BATCH_SIZE}; beam_size=3, no_repeat_ngram_size=4, repetition_penalty=1.12, "
                      "language forced per file, without_timestamps, condition_on_previous_text=False, the card's "
                      "duration-based token limit made effective (max_new_tokens 2 x limit - 4: faster-whisper "
                      "given the limit itself stops CTranslate2 at about half of it); CTranslate2 weights "
                      "{quantization}; "
                      "cpu_threads = OMP_NUM_THREADS, else all cores",
}
ENV_SHOWN = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


class Skip(Exception):
    """A system that cannot run here; its row says why instead of failing the comparison."""


@dataclass
class RunResult:
    """One timed run of one system."""

    wall_s: float
    inner_s: float | None = None  # the system's own clock: model load + transcription, no interpreter start
    texts: dict[str, str] = field(default_factory=dict)
    failed_files: int = 0
    gpu_util: float | None = None
    error: str | None = None


@dataclass
class Context:
    """What every run of the comparison shares."""

    manifest: Path
    model: str
    device: str
    scratch: Path
    work: Path
    krasr_args: list[str]
    gpu_util: bool
    env: dict[str, str] = field(default_factory=dict)  # --env: set for every system's command
    ct2_model: str | None = None
    manifests: dict[str, Path] = field(default_factory=dict)  # --sample: a system's own manifest of every K-th file
    runs: int = 0
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])


def prepare(system: str, ctx: Context) -> None:
    """Check a system can run here and do its untimed preparation; raise Skip with the reason if it cannot."""
    if system != "faster-whisper":
        return
    missing = [m for m in ("faster_whisper", "ctranslate2") if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"not installed ({', '.join(missing)}): pip install -e '.[bench]'")
    if ctx.device == "cuda":
        try:
            import ctranslate2

            gpus = ctranslate2.get_cuda_device_count()
        except Exception as e:  # noqa: BLE001 - a broken CUDA setup is a reason to skip, not to stop
            raise Skip(f"ctranslate2 cannot query CUDA: {e}") from e
        if gpus == 0:
            raise Skip("ctranslate2 sees no CUDA device (CPU-only build, or CUDA 12 / cuDNN 9 libraries missing)")
    from krasr_batch.engines.ctranslate2 import converted_model

    if not (Path(ctx.model) / "tokenizer.json").exists():
        raise Skip(f"{ctx.model} has no tokenizer.json: faster-whisper reads it beside the converted model.bin")
    try:
        ctx.ct2_model = str(converted_model(ctx.model, ctx.work / "ct2", ct2_quantization(ctx.device)))
    except (OSError, RuntimeError) as e:
        raise Skip(f"conversion to CTranslate2 failed: {e}") from e


def krasr_args(system: str, ctx: Context) -> list[str]:
    """The extra `krasr-batch run` arguments of a krasr system: --krasr-args, then the engine krasr-tf forces."""
    return ctx.krasr_args + (["--engine", "transformers"] if system == "krasr-tf" else [])


def command(system: str, ctx: Context, out: Path) -> list[str]:
    """The whole command that one run of ``system`` times, writing what it produces under ``out``."""
    manifest = ctx.manifests.get(system, ctx.manifest)
    if system in KRASR_SYSTEMS:
        device = ["--device", ctx.device] if ctx.device else []
        return [sys.executable, "-m", "krasr_batch", "run", str(manifest), "--out", str(out),
                "--model", ctx.model, "--no-progress", *device, *krasr_args(system, ctx)]
    model = ctx.ct2_model if system == "faster-whisper" else ctx.model
    return [sys.executable, "-m", "benchmarks.baselines", system, str(manifest), "--model", str(model),
            "--device", ctx.device, "--result", str(out / "result.json")]


def collect(system: str, out: Path) -> tuple[dict[str, str], float | None, int]:
    """(texts by id, the system's own wall seconds, failed files) from what a run left under ``out``."""
    if system in KRASR_SYSTEMS:
        import pyarrow.dataset as pads

        rows = pads.dataset(str(out / "files"), format="parquet").to_table(
            columns=["file_id", "status", "text"]).to_pylist()
        run_json = out / "run.json"
        inner = json.loads(run_json.read_text()).get("wall_s") if run_json.exists() else None
        texts = {r["file_id"]: (r["text"] or "") if r["status"] == "ok" else "" for r in rows}
        return texts, inner, sum(r["status"] != "ok" for r in rows)
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    return result["texts"], result.get("wall_s"), 0


def last_error_line(log_path: Path) -> str:
    """The last telling line of a failed command's stderr (the exception or the CLI's error line)."""
    try:
        lines = [x.strip() for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no output)"
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def nvidia_library_path() -> str:
    """Folders of the CUDA libraries pip installed with torch (nvidia-cublas-cu12, nvidia-cudnn-cu12, ...).

    CTranslate2's wheel loads cuBLAS and cuDNN from the library path, where pip's copies are not by default.
    """
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    dirs = sorted(str(d) for root in roots for d in Path(root).glob("*/lib") if d.is_dir())
    return os.pathsep.join(dirs)


def command_env(system: str, ctx: Context) -> dict[str, str]:
    """The environment of a system's command: ours, offline hub, --env, this repository importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **ctx.env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if system == "faster-whisper" and ctx.device == "cuda":
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [env.get("LD_LIBRARY_PATH"), nvidia_library_path()]))
    return env


def run_once(system: str, ctx: Context) -> RunResult:
    """Run ``system`` once as a whole command and time it; failures become a RunResult with ``error``."""
    ctx.runs += 1
    out = ctx.scratch / f"{ctx.runs:03d}-{system}"
    out.mkdir(parents=True)
    krasr = system in KRASR_SYSTEMS
    cmd = command(system, ctx, out / "out" if krasr else out)
    log.info("run %d: %s", ctx.runs, shlex.join(cmd))
    env = command_env(system, ctx)
    sampler = GpuSampler() if ctx.gpu_util and ctx.device == "cuda" else None
    with open(out / "stderr.log", "w") as err, sampler or contextlib.nullcontext():
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
        wall = time.perf_counter() - t0
    gpu = sampler.mean() if sampler else None
    if rc not in (0, 3) or (krasr and not (out / "out" / "files").exists()):
        return RunResult(wall, gpu_util=gpu, error=f"exit {rc}: {last_error_line(out / 'stderr.log')}")
    texts, inner, failed = collect(system, out / "out" if krasr else out)
    log.info("run %d: %s took %.1f s", ctx.runs, system, wall)
    return RunResult(wall, inner, texts, failed, gpu)


def run_all(systems: list[str], ctx: Context, repeat: int) -> tuple[dict[str, list[RunResult]], dict[str, str]]:
    """Prepare every system, then run them interleaved ``repeat`` times; (results, skip reasons)."""
    skipped: dict[str, str] = {}
    for s in systems:
        try:
            prepare(s, ctx)
        except Skip as e:
            log.warning("%s skipped: %s", s, e)
            skipped[s] = str(e)
    runnable = [s for s in systems if s not in skipped]
    results: dict[str, list[RunResult]] = {s: [] for s in runnable}
    for _ in range(repeat):
        for s in runnable:
            results[s].append(run_once(s, ctx))
    return results, skipped
