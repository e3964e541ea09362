"""Throughput and accuracy of krasr-batch against its peers, back to back on one corpus and one model.

    python -m benchmarks.compare --corpus DIR --model DIR [--set clips|long|all] [--device cpu|cuda]
        [--limit N] [--systems krasr,krasr-tf,card,chunked,faster-whisper] [--krasr-args "..."] [--repeat K]
        [--env KEY=VALUE ...] [--gpu-util] [--write BENCHMARKS.md --section NAME] [--json OUT.json]
        [--work DIR]

Systems, each run as a whole command in its own process (wall time = the whole command: interpreter start,
imports, model load and transcription; for krasr-batch also the embedded Ray's start):

- ``krasr``: ``python -m krasr_batch run MANIFEST --out TMP --model M --no-progress [--device D] ...``;
  texts read from TMP/files.
- ``krasr-tf``: the same with ``--engine transformers`` last, to set krasr-batch's two engines side by side
  when --krasr-args picks ``--engine ctranslate2``.
- ``card``: the model card's usage, the transformers ASR pipeline one file at a time
  (benchmarks.baselines.card_usage).
- ``chunked``: the insanely-fast-whisper recipe: one pipeline call per language over the list of files,
  chunk_length_s=30, batch_size=16 (benchmarks.baselines.chunked_pipeline).
- ``faster-whisper``: faster-whisper's BatchedInferencePipeline on the weights converted to CTranslate2
  (float32 on the CPU, float16 on CUDA; the conversion is cached under --work and not timed). Where
  faster-whisper cannot run, its row says why.

For each system: audio seconds (file headers), wall seconds (median of --repeat runs, interleaved
A B C D A B C D ...), RTFx (audio s / wall s), its RTFx over krasr-batch's, and corpus-level WER/CER
against the corpus references after krasr_batch.textnorm.normalize. ``--write FILE --section NAME``
replaces the ``<!-- bench:NAME -->`` block of FILE (or appends one), so reruns refresh figures in place.

On a CPU shared with other work, OpenMP's spinning threads (torch, CTranslate2) can slow a system many
times over whenever another process holds a core; ``--env OMP_WAIT_POLICY=PASSIVE`` (set for every system,
and shown in the report) or a quiet machine keeps the comparison about the systems. krasr-batch sizes its
own model actor's torch threads (one core left to the segment tasks); the peers use every core.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jiwer

from benchmarks.baselines import PEER_BATCH_SIZE, audio_duration_s, ct2_quantization
from krasr_batch.textnorm import normalize

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
    "krasr": "`krasr-batch run` defaults (VAD windows ≤30 s at pauses, card's token-limit table, batches of "
             "one language and limit), plus --krasr-args",
    "krasr-tf": "as krasr-batch, with `--engine transformers` last (the card's own generate() call)",
    "card": "transformers pipeline per file; task=transcribe, language per file, num_beams=3, "
            "no_repeat_ngram_size=4, repetition_penalty=1.12, card's duration-based max_new_tokens; "
            "chunk_length_s=30 past 30 s",
    "chunked": f"one pipeline call per language over the file list; chunk_length_s=30, batch_size={PEER_BATCH_SIZE}; "
               "the card's generate settings with max_new_tokens=128",
    "faster-whisper": "BatchedInferencePipeline (Silero VAD chunks ≤30 s, vad_filter default), "
                      f"batch_size={PEER_BATCH_SIZE}; beam_size=3, no_repeat_ngram_size=4, repetition_penalty=1.12, "
                      "language forced per file, without_timestamps, condition_on_previous_text=False, card's "
                      "duration-based max_new_tokens; CTranslate2 weights {quantization}; "
                      "cpu_threads = OMP_NUM_THREADS, else all cores",
}
GPU_POLL_S = 0.5
STEADY_TRIM = 0.1  # fraction of GPU samples dropped at each end of a run
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
class Row:
    """One line of the table."""

    system: str
    files: int
    audio_s: float
    wall_s: float | None = None
    inner_s: float | None = None
    rtfx: float | None = None
    vs_krasr: float | None = None
    wer: float | None = None
    cer: float | None = None
    gpu_util: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------- corpus


def load_corpus(corpus: Path, which: str, limit: int = 0) -> list[dict]:
    """Corpus lines of ``which`` (clips, long or all) with absolute paths and header durations; first ``limit``."""
    names = {"clips": ["clips"], "long": ["long"], "all": ["clips", "long"]}[which]
    items = []
    for name in names:
        for line in (corpus / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                items.append(json.loads(line))
    if limit:
        items = items[:limit]
    for it in items:
        it["path"] = str((corpus / it["path"]).resolve())
        it["duration_s"] = audio_duration_s(it["path"])
    return items


def write_manifest(items: list[dict], path: Path) -> Path:
    """The manifest every system reads: id, path, language, its Whisper code (for faster-whisper), reference."""
    from krasr_batch.engines import language_code

    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            line = {k: it[k] for k in ("id", "path", "language", "text") if k in it}
            line["whisper_language"] = language_code(it.get("language") or "kazakh")
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def score(items: list[dict], texts: dict[str, str]) -> tuple[float | None, float | None]:
    """Corpus-level (WER, CER) of ``texts`` against the items' references, both sides normalized."""
    pairs = [(normalize(it.get("text")), normalize(texts.get(it["id"], ""))) for it in items]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return None, None
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return jiwer.wer(refs, hyps), jiwer.cer(refs, hyps)


# ---------------------------------------------------------------------------------------------- machine


def cpu_description() -> str:
    """CPU model name from /proc/cpuinfo and the core count."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def gpu_index() -> str:
    """nvidia-smi index of the GPU the systems use (the first of CUDA_VISIBLE_DEVICES, else 0)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return first if first.isdigit() else "0"


def gpu_name() -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process), else from torch."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", gpu_index()],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    import torch

    return torch.cuda.get_device_name(0)


def device_description(device: str) -> str:
    """What the figures were measured on."""
    if device == "cuda":
        return f"{gpu_name()} (host: {cpu_description()})"
    return cpu_description()


def model_description(model: str) -> str:
    """The model folder and, where it has one, its BUILT stamp (variant, parameters)."""
    built = Path(model) / "BUILT"
    try:
        info = json.loads(built.read_text())
    except (OSError, ValueError):
        return model
    extra = ", ".join(f"{k} {v}" for k, v in info.items())
    return f"{model} ({extra})" if extra else model


def versions() -> str:
    """Package versions that decide the figures."""
    out = []
    for pkg in ("krasr-batch", "torch", "transformers", "ray", "ctranslate2", "faster-whisper"):
        try:
            out.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------- GPU load


def steady_mean(samples: list[float], trim: float = STEADY_TRIM) -> float | None:
    """Mean of ``samples`` without the first and last ``trim`` fraction (start-up and wind-down)."""
    if not samples:
        return None
    k = int(len(samples) * trim)
    kept = samples[k: len(samples) - k] or samples
    return sum(kept) / len(kept)


class GpuSampler:
    """Polls nvidia-smi's utilization.gpu every ``interval_s`` in a thread while the context is open."""

    def __init__(self, interval_s: float = GPU_POLL_S, index: str | None = None):
        self.interval_s = interval_s
        self.index = index or gpu_index()
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def _read(self) -> float | None:
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                "-i", self.index], capture_output=True, text=True, timeout=5)
            return float(r.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def mean(self) -> float | None:
        return steady_mean(self.samples)


# ---------------------------------------------------------------------------------------------- systems


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
    if system in KRASR_SYSTEMS:
        device = ["--device", ctx.device] if ctx.device else []
        return [sys.executable, "-m", "krasr_batch", "run", str(ctx.manifest), "--out", str(out),
                "--model", ctx.model, "--no-progress", *device, *krasr_args(system, ctx)]
    model = ctx.ct2_model if system == "faster-whisper" else ctx.model
    return [sys.executable, "-m", "benchmarks.baselines", system, str(ctx.manifest), "--model", str(model),
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


# ---------------------------------------------------------------------------------------------- report


def summarize(system: str, runs: list[RunResult], items: list[dict]) -> Row:
    """One table row from a system's runs: median wall of the good runs, accuracy of the first good run."""
    audio = sum(it["duration_s"] for it in items)
    row = Row(system, len(items), audio)
    good = [r for r in runs if r.error is None]
    errors = [r.error for r in runs if r.error is not None]
    if not good:
        row.note = f"failed: {errors[0]}" if errors else "not run"
        return row
    row.wall_s = statistics.median(r.wall_s for r in good)
    inner = [r.inner_s for r in good if r.inner_s is not None]
    row.inner_s = statistics.median(inner) if inner else None
    row.rtfx = audio / row.wall_s if row.wall_s > 0 else None
    row.wer, row.cer = score(items, good[0].texts)
    utils = [r.gpu_util for r in good if r.gpu_util is not None]
    row.gpu_util = statistics.median(utils) if utils else None
    notes = []
    if good[0].failed_files:
        notes.append(f"{good[0].failed_files} files failed")
    if errors:
        notes.append(f"{len(errors)} of {len(runs)} runs failed: {errors[0]}")
    row.note = "; ".join(notes)
    return row


def build_rows(systems: list[str], results: dict[str, list[RunResult]], skipped: dict[str, str],
               items: list[dict]) -> list[Row]:
    """Rows in the order asked for, with each RTFx relative to krasr-batch's."""
    rows = []
    for s in systems:
        if s in skipped:
            rows.append(Row(s, len(items), sum(it["duration_s"] for it in items), note=f"skipped: {skipped[s]}"))
        else:
            rows.append(summarize(s, results[s], items))
    ref = next((r.rtfx for r in rows if r.system == "krasr"), None)
    for r in rows:
        if ref and r.rtfx:
            r.vs_krasr = r.rtfx / ref
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def render_table(rows: list[Row], gpu_util: bool = False) -> str:
    """The Markdown table of the comparison."""
    head = ["system", "files", "audio s", "wall s", "in-process s", "RTFx", "vs krasr-batch", "WER %", "CER %"]
    if gpu_util:
        head.append("GPU util %")
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [LABELS.get(r.system, r.system), str(r.files), _fmt(r.audio_s, ".1f"), _fmt(r.wall_s, ".1f"),
                 _fmt(r.inner_s, ".1f"), _fmt(r.rtfx, ".2f"), _fmt(r.vs_krasr, ".2f", "×"),
                 _fmt(None if r.wer is None else 100 * r.wer, ".1f"),
                 _fmt(None if r.cer is None else 100 * r.cer, ".1f")]
        if gpu_util:
            cells.append(_fmt(r.gpu_util, ".0f"))
        cells.append(r.note.replace("|", "/").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(table: str, meta: dict[str, str]) -> str:
    """The table followed by its metadata as a Markdown list."""
    return table + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"


def metadata(a: argparse.Namespace, argv: list[str], items: list[dict], systems: list[str], ctx: Context) -> dict:
    """Date, device, model, corpus, settings and the exact command of a comparison."""
    langs = Counter(it.get("language", "?") for it in items)
    audio = sum(it["duration_s"] for it in items)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{ctx.device}: {device_description(ctx.device)}; load average before the runs "
                  f"{ctx.load_before:.2f}",
        "model": model_description(a.model),
        "corpus": f"{a.corpus} set `{a.set}`, {len(items)} files, {audio:.1f} s of audio "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(langs.items()))})",
        "timing": f"wall = whole command (interpreter start, imports, model load, transcription), median of "
                  f"{a.repeat} interleaved run(s); in-process = the system's own clock (model load + "
                  "transcription); RTFx = audio s / wall s",
        "accuracy": "corpus-level WER/CER (jiwer) after krasr_batch.textnorm.normalize",
    }
    if a.gpu_util:
        meta["GPU util"] = (f"nvidia-smi utilization.gpu every {GPU_POLL_S} s, mean without the first and last "
                            f"{int(STEADY_TRIM * 100)} % of each run")
    for s in systems:
        text = SETTINGS[s].replace("{quantization}", ct2_quantization(ctx.device))
        args = krasr_args(s, ctx)
        if s in KRASR_SYSTEMS and args:
            text += f" (`{shlex.join(args)}`)"
        meta[f"settings {LABELS[s]}"] = text
    meta["versions"] = versions()
    env = {**{k: os.environ[k] for k in ENV_SHOWN if os.environ.get(k)}, **ctx.env}
    if env:
        meta["environment"] = " ".join(f"{k}={v}" for k, v in env.items())
    meta["command"] = f"`python -m benchmarks.compare {shlex.join(argv)}`"
    return meta


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block of ``path``, or append one."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="corpus folder (clips.jsonl, long.jsonl)")
    ap.add_argument("--model", required=True, help="local model folder, transformers format")
    ap.add_argument("--set", choices=["clips", "long", "all"], default="clips")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees one, else cpu")
    ap.add_argument("--limit", type=int, default=0, help="only the first N files of the set")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ",".join(SYSTEMS))
    ap.add_argument("--krasr-args", default="", help="extra arguments for `krasr-batch run`, one string")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each system, interleaved; the median wall counts")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set for every system's command (e.g. OMP_WAIT_POLICY=PASSIVE on a shared CPU); repeatable")
    ap.add_argument("--gpu-util", action="store_true", help="sample GPU utilization during each run (CUDA)")
    ap.add_argument("--write", help="Markdown file whose bench block to replace or append (e.g. BENCHMARKS.md)")
    ap.add_argument("--section", help="name of the bench block (with --write)")
    ap.add_argument("--json", help="also write rows and metadata as JSON here")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "krasr-batch-bench"),
                    help="cache for CTranslate2 conversions")
    a = ap.parse_args(argv)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        ap.error(f"unknown systems {unknown}; choose from {','.join(SYSTEMS)}")
    if bool(a.write) != bool(a.section):
        ap.error("--write and --section go together")
    if a.repeat < 1 or a.limit < 0:
        ap.error("--repeat must be at least 1 and --limit not negative")
    bad_env = [e for e in a.env if "=" not in e or not e.split("=", 1)[0]]
    if bad_env:
        ap.error(f"--env wants KEY=VALUE, got {bad_env}")
    a.systems = systems
    a.env = dict(e.split("=", 1) for e in a.env)
    return a


def resolve_device(device: str | None) -> str:
    """The device asked for, else cuda when torch sees one, else cpu."""
    if device:
        return device
    from krasr_batch.engines import resolve_device as resolve

    return resolve("auto")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the report; 0 when every system that could run ran, 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    items = load_corpus(Path(a.corpus), a.set, a.limit)
    if not items:
        log.error("no files in set %s of %s", a.set, a.corpus)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="krasr-compare-"))
    try:
        ctx = Context(write_manifest(items, scratch / "manifest.jsonl"), str(Path(a.model).resolve()),
                      resolve_device(a.device), scratch, Path(a.work), shlex.split(a.krasr_args), a.gpu_util,
                      a.env)
        results, skipped = run_all(a.systems, ctx, a.repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = build_rows(a.systems, results, skipped, items)
    meta = metadata(a, argv, items, a.systems, ctx)
    report = render_report(render_table(rows, a.gpu_util and ctx.device == "cuda"), meta)
    print(report)
    if a.write:
        write_section(Path(a.write), a.section, f"### {a.section}\n\n{report}")
        log.info("wrote block %r of %s", a.section, a.write)
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "metadata": meta},
                                           ensure_ascii=False, indent=1), encoding="utf-8")
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
