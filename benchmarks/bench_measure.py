"""benchmarks.compare, measuring: the corpus and its manifest, accuracy (through krasr_batch.evaluate, the
same WER and CER as ``krasr-batch eval``), the machine's description and the GPU's utilisation."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import threading
from pathlib import Path

from benchmarks.baselines import audio_duration_s
from krasr_batch.evaluate import aggregate, score_pair
from krasr_batch.textnorm import normalize

log = logging.getLogger(__name__)

GPU_POLL_S = 0.5
STEADY_TRIM = 0.1  # fraction of GPU samples dropped at each end of a run


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
    """Corpus-level (WER, CER) of ``texts`` against the items' references (items without one are skipped)."""
    scores = [score_pair(it.get("text"), texts.get(it["id"], "")) for it in items if normalize(it.get("text"))]
    if not scores:
        return None, None
    metrics = aggregate(scores)
    return metrics.wer, metrics.cer


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
