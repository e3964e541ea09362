"""The GPU path, measured in one command: correctness, the model stage's throughput, the peers, the CPU feed.

    python -m benchmarks.gpu_check prepare --corpus DIR --data .gpu [--clips N] [--long N]   # here, once
    python -m benchmarks.gpu_check --data .gpu --out OUT [--device cuda|cpu] [--quick] [--budget-s S]
        [--limits card|fit] [--model DIR] [--sections a,b,c,d,compile] [--workers N]

``prepare`` runs where the corpus and every package are: it converts the corpus audio to 16 kHz mono 16-bit
WAV with krasr-batch's own decoder (soundfile + soxr), plans each file's segments with krasr-batch's own
VAD stage (``krasr_batch.segment.analyse``), and writes ``plan.json``, the WAVs, the original long
recordings (for the CPU feed) and the tokenizer / feature-extractor / config files of a test model (no
weights) into ``--data``. The check itself then needs only torch, transformers and numpy for its GPU
sections (the WAVs are read with the standard library's ``wave``), and soundfile, soxr, onnxruntime and
silero-vad for the CPU feed; no Ray (its wheel is too big to carry), so stages are measured without Ray.

Sections, each written to OUT/gpu_check.json and OUT/gpu_check.md as soon as it ends (a timeout keeps
what was measured):

- ``a`` correctness: krasr-batch's transformers engine (``WhisperDecoder``) in float16 at batch 1 against
  batch 64 over the same segments (each batch of 64 filled by repeating the group's segments), and float32
  on the device against float32 on the CPU; equal-text counts.
- ``b`` model-stage throughput: ``WhisperDecoder.decode`` over a workload of planned segments, float16 and
  bfloat16 (SDPA), batches of 16/32/64/128; RTFx = audio seconds / wall seconds of the stage; GPU
  utilisation sampled with NVML; peak memory.
- ``c`` peers on the same device and audio: the card's ASR pipeline at batch 1 (one call a file, as the
  card's usage), the chunked pipeline (chunk_length_s=30, batches of 16 and 64), faster-whisper where
  CTranslate2 loads; krasr-batch on the same files for the row beside them.
- ``d`` CPU feed: decode, resample, Silero VAD and cut (``krasr_batch.segment``) over the long recordings in
  ``--workers`` processes; audio seconds per wall second, and the cores one GPU needs.
- ``compile``: section b's float16 (and bfloat16) runs with a static cache, which makes transformers'
  generate() torch.compile the decoder step; at ``--compile-batches`` only (compiling costs minutes).

The model is built on the machine (random weights of the KRASR model's shape: whisper-small) from the
carried config and tokenizer files; random weights rarely emit end-of-text, so segments decode up to their
token limit: the worst case for decoding length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
import wave
from collections import defaultdict
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_check")

SR = 16000
MODEL_FILES = ("config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
SHAPES = {
    "small-random": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                         decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    "tiny-random": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128),
}
CHUNK_LENGTH_S = 30
ENGINE_NAMES = {"transformers": "WhisperDecoder", "torch": "torch engine",
                "torch-device": "torch engine, device search", "torch-graphed": "torch engine, CUDA graphs"}


def engine_setting(engine: str) -> tuple[str, str | None]:
    """(krasr-batch's --engine, the torch engine's search) of a row's engine label: ``torch-device`` is the
    torch engine with every beam choice on the device (``TorchBeamDecoder.search = "device"``),
    ``torch-graphed`` with each step one CUDA graph (``"graphed"``)."""
    if engine.startswith("torch-"):
        return "torch", engine[len("torch-"):]
    return engine, None
CARD = dict(task="transcribe", num_beams=3, no_repeat_ngram_size=4, repetition_penalty=1.12)

# runs: section b's eager runs in order (engine, dtype, batch); the order puts what matters most first, so a
# spent time budget drops the least useful, and each engine's row at one batch runs side by side with the
# other's in the same process (at each batch the torch engine's device search, its host search, then its CUDA
# graphs, whose capture has not yet run on a GPU); diagnostic: --engine's float16 at this batch with
# no_repeat_ngram_size=0 (not the card's settings: it shows what the n-gram ban costs)
FULL = dict(correct_clips=8, correct_windows=4, correct_b=64, fp32_n=4, workload=384,
            runs=(("torch-device", "float16", 64), ("torch", "float16", 64), ("torch-graphed", "float16", 64),
                  ("torch-device", "float16", 128), ("torch", "float16", 128), ("torch-graphed", "float16", 128),
                  ("torch-device", "float16", 192), ("torch", "float16", 192), ("torch-graphed", "float16", 192),
                  ("torch-device", "float16", 384), ("torch", "float16", 384), ("torch-graphed", "float16", 384),
                  ("transformers", "float16", 64), ("torch-graphed", "bfloat16", 64), ("torch", "bfloat16", 64),
                  ("transformers", "float16", 128), ("torch-graphed", "float16", 32), ("torch", "float16", 32)),
            diagnostic_batch=64,
            peer_clips=16, peer_long=1, chunk_batches=(16, 64), feed_tasks=45,
            compile_runs=(("float16", 64), ("bfloat16", 64)), compile_workload=192, model="small-random")
QUICK = dict(correct_clips=2, correct_windows=1, correct_b=4, fp32_n=1, workload=4,
             runs=(("torch-graphed", "float16", 4), ("torch-device", "float16", 4), ("torch", "float16", 4),
                   ("transformers", "float16", 4), ("torch", "bfloat16", 4)),
             diagnostic_batch=4,
             peer_clips=2, peer_long=0, chunk_batches=(4,), feed_tasks=2,
             compile_runs=(("float16", 4),), compile_workload=8, model="tiny-random")
SECTIONS = ("a", "b", "c", "d", "compile")
# what runs when: what "done" needs first (the main float16 figures, correctness, the peers, the CPU feed),
# then one compiled run (its compile costs a minute or more, and may fail), then the remaining batch sizes
ORDER = (("b", 1), ("a", 1), ("c", 1), ("d", 1), ("compile", 1), ("b", 2), ("compile", 2))


# ---------------------------------------------------------------------------------------------- the seam


def token_limit(duration_s: float, whole_clip: bool, policy: str = "card") -> int:
    """max_new_tokens for one segment: THE seam between this check and krasr-batch's token-limit policy.

    ``card``: the model card's duration table, for whole clips and windows alike (``--token-limit card``).
    ``fit``: krasr-batch's default (``--token-limit fit``): whole clips keep the card's limit; windows cut
    from long recordings get 12 tokens a second of their card bucket's upper edge (60 ... 360).
    """
    from krasr_batch.engines import segment_token_limit

    return segment_token_limit(duration_s, whole_clip, policy)


# ---------------------------------------------------------------------------------------------- prepare


def write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        if w.getframerate() != SR or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: not 16 kHz mono 16-bit")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def prepare(corpus: Path, data: Path, model_files: Path, clips: int, longs: int) -> dict:
    """Convert, plan and copy what the check needs into ``data`` (see the module's docstring)."""
    from krasr_batch.audio import load_audio
    from krasr_batch.segment import analyse
    from krasr_batch.settings import SegmentOptions

    if data.exists():
        shutil.rmtree(data)
    (data / "wav").mkdir(parents=True)
    (data / "long").mkdir()
    (data / "model").mkdir()
    for name in MODEL_FILES:
        if (model_files / name).exists():
            shutil.copy2(model_files / name, data / "model" / name)
    rows = []
    for manifest, kind, limit in (("clips.jsonl", "clip", clips), ("long.jsonl", "long", longs)):
        items = [json.loads(x) for x in (corpus / manifest).read_text(encoding="utf-8").splitlines() if x.strip()]
        for it in items[:limit]:
            src = corpus / it["path"]
            plan = analyse(str(src), SegmentOptions())
            audio = load_audio(str(src))
            write_wav(data / "wav" / f"{it['id']}.wav", audio)
            row = dict(id=it["id"], kind=kind, language=it.get("language") or "kazakh", wav=f"wav/{it['id']}.wav",
                       duration_s=len(audio) / SR,
                       # each window as its stretches of the source (a window skips the middles of long pauses)
                       segments=[[list(p) for p in plan.window_pieces(k)] for k in range(len(plan.segments))],
                       whole=plan.segments == [(0, len(audio))], source=it["path"])
            if kind == "long":
                dest = data / "long" / Path(it["path"]).name
                shutil.copy2(src, dest)
                row["original"] = f"long/{dest.name}"
            rows.append(row)
    plan = dict(corpus=str(corpus), files=rows)
    (data / "plan.json").write_text(json.dumps(plan, indent=1, ensure_ascii=False), encoding="utf-8")
    return plan


# ---------------------------------------------------------------------------------------------- results


class Results:
    """The JSON document, rewritten (with its Markdown block) after every step."""

    def __init__(self, out: Path, argv: list[str]):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.doc: dict = dict(command="python -m benchmarks.gpu_check " + " ".join(argv), started=time.time(),
                              sections={s: {"status": "pending"} for s in SECTIONS})

    def section(self, name: str) -> dict:
        return self.doc["sections"][name]

    def skip(self, name: str, reason: str) -> None:
        sec = self.section(name)
        sec["status"] = "skipped"
        sec["reason"] = reason
        log.warning("section %s skipped: %s", name, reason)
        self.save()

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.time() - self.doc["started"], 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(self.out / "gpu_check.json")
        (self.out / "gpu_check.md").write_text(render_markdown(self.doc), encoding="utf-8")


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def enough(self, need: float) -> bool:
        return self.left() >= need


# ---------------------------------------------------------------------------------------------- inputs


class Corpus:
    """The carried plan: file audio (16 kHz float32) and each file's planned segments."""

    def __init__(self, data: Path, policy: str):
        self.data = data
        self.policy = policy
        self.files = json.loads((data / "plan.json").read_text(encoding="utf-8"))["files"]
        self.audio = {f["id"]: read_wav(data / f["wav"]) for f in self.files}

    def segments(self, files: list[dict] | None = None) -> list[dict]:
        """Every planned segment once, in file order: {file, kind, language, audio, duration_s, limit}."""
        out = []
        for f in files if files is not None else self.files:
            a = self.audio[f["id"]]
            for window in f["segments"]:
                parts = [window] if isinstance(window[0], int) else window  # plans written before windows had parts
                audio = np.concatenate([a[s:e] for s, e in parts])
                d = len(audio) / SR
                out.append(dict(file=f["id"], kind=f["kind"], language=f["language"], audio=audio, duration_s=d,
                                whole=f["whole"], limit=token_limit(d, f["whole"], self.policy)))
        return out


def inputs_of(segs: list[dict]):
    from krasr_batch.engines import SegmentInput

    return [SegmentInput(s["audio"], s["language"], s["limit"]) for s in segs]


def stratified(segs: list[dict], n: int) -> list[dict]:
    """``n`` segments spread evenly over the list (both clips and windows of long recordings)."""
    if n >= len(segs):
        return list(segs)
    step = len(segs) / n
    return [segs[int(i * step)] for i in range(n)]


def tiled(segs: list[dict], n: int) -> list[dict]:
    """The segments repeated in order until there are ``n`` (the same mix of clips and windows)."""
    return [segs[i % len(segs)] for i in range(n)]


def audio_s(segs: list[dict]) -> float:
    return sum(s["duration_s"] for s in segs)


# ---------------------------------------------------------------------------------------------- device


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def device_info(device: str) -> dict:
    import torch
    import transformers

    info = dict(device=device, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, numpy=np.__version__, cpu_count=os.cpu_count(),
                cpu=platform.processor() or platform.machine())
    try:
        info["cpu"] = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["c_compiler"] = shutil.which("cc") or shutil.which("gcc")  # Triton (torch.compile) builds its launchers with it
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


class GpuSampler:
    """GPU utilisation (%) from NVML every ``interval_s`` in a thread; nothing where NVML is missing."""

    def __init__(self, device: str, interval_s: float = 0.2):
        self.samples: list[float] = []
        self.interval_s = interval_s
        self.error = None
        self._stop = threading.Event()
        self._handle = None
        if device == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            except Exception as e:  # noqa: BLE001 - no NVML: no samples, and say why
                self.error = f"{type(e).__name__}: {e}"
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self._handle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            except Exception:  # noqa: BLE001
                pass

    def summary(self) -> dict:
        if not self.samples:
            return dict(gpu_util_mean=None, gpu_util_samples=0, **({"gpu_util_error": self.error} if self.error else {}))
        k = len(self.samples) // 10  # drop the first and last tenth: start and end of the run
        kept = self.samples[k:len(self.samples) - k] or self.samples
        return dict(gpu_util_mean=round(sum(kept) / len(kept), 1), gpu_util_samples=len(self.samples))


def error_of(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:400] if msg else ''}"


def is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- model


def build_model(variant: str, files: Path, out: Path, seed: int = 0) -> Path:
    """A Whisper of ``variant``'s shape with random weights (fixed seed), saved in float16 safetensors with the
    carried tokenizer and feature extractor: the shapes of krasr_batch.testing.models, built here from carried files (that machine has no registry)."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    if (out / "BUILT").exists():
        return out
    cfg = WhisperConfig.from_pretrained(files)
    for k, v in SHAPES[variant].items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    gc = GenerationConfig.from_pretrained(files)
    gc.alignment_heads = [[SHAPES[variant]["decoder_layers"] - 1, 0]]
    # Random weights emit timestamp tokens after <|notimestamps|>, which no trained model does; Whisper's
    # generate() then seeks and decodes the same input again (its long-form loop) and returns fewer rows than
    # inputs (seen on the H100: 45 rows for 64 inputs, minutes per batch). Suppressed here, in this check's
    # own random model, so every system decodes each segment in one pass, as a trained model does.
    first_timestamp = gc.no_timestamps_token_id + 1
    gc.suppress_tokens = sorted(set(gc.suppress_tokens or []) | set(range(first_timestamp, cfg.vocab_size)))
    model.generation_config = gc
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    WhisperProcessor.from_pretrained(files).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    (out / "BUILT").write_text(json.dumps({"variant": variant, "parameters": n}) + "\n")
    return out


def load(ctx, model: str, device: str, dtype: str, batch: int, engine: str | None = None, words: bool = False):
    """One replica of ``--engine`` (transformers: WhisperDecoder, generate(); torch: TorchBeamDecoder). The
    torch engine has no float16 on CPUs: the CPU dry run runs its float16 rows in bfloat16."""
    from krasr_batch.engines import engine_class
    from krasr_batch.settings import DecodeOptions

    engine, search = engine_setting(engine or ctx.engine)
    if engine == "torch" and device == "cpu" and dtype == "float16":
        dtype = "bfloat16"
    dec = engine_class(engine)(DecodeOptions(model=model, engine=engine, dtype=dtype, batch_size=batch,
                                             word_timestamps=words, token_limit=ctx.policy), device)
    if search is not None:
        dec.search = search
    return dec


def decode_timed(dec, inputs, device: str) -> tuple[list, float]:
    sync(device)
    t0 = time.perf_counter()
    out = dec.decode(inputs)
    sync(device)
    return out, time.perf_counter() - t0


def generate_calls(inputs, batch: int, engine: str = "transformers") -> tuple[int, int]:
    """(model calls, decoder steps at most) of ``decode``: the engine's own batches (``Decoder.batch_plan``),
    each stepping up to the largest token limit in it."""
    from krasr_batch.engines import engine_class

    plan = engine_class(engine_setting(engine)[0]).batch_plan(inputs, batch)
    return len(plan), sum(max(inputs[i].max_new_tokens for i in idx) for idx in plan)


def equal_counts(a: list, b: list) -> dict:
    eq = sum(x.text == y.text for x, y in zip(a, b))
    same_tokens = []
    for x, y in zip(a, b):
        tx, ty = x.text.split(), y.text.split()
        k = 0
        while k < min(len(tx), len(ty)) and tx[k] == ty[k]:
            k += 1
        same_tokens.append(k / max(1, max(len(tx), len(ty))))
    return dict(segments=len(a), equal_text=eq, equal_pct=round(100.0 * eq / max(1, len(a)), 1),
                mean_common_word_prefix=round(float(np.mean(same_tokens)) if same_tokens else 0.0, 3),
                truncated=sum(x.truncated for x in a))


# ---------------------------------------------------------------------------------------------- sections


def compare_searches(dec, inputs, mine: list, device: str) -> dict:
    """For the torch engine: each search other than ``host`` against the host search on ``inputs`` (``mine``:
    ``dec``'s own search's outputs), {search: equal_counts and seconds, or the error}; {} for other engines.
    A search that fails (a CUDA graph that cannot be captured, say) is an error row, not a failed section."""
    from krasr_batch.engines.torch_beam import SEARCHES

    own = getattr(dec, "search", None)
    if own is None:
        return {}
    runs = {own: mine}
    out: dict = {}
    try:
        if "host" not in runs:
            dec.search = "host"
            runs["host"], _ = decode_timed(dec, inputs, device)
        for search in SEARCHES:
            if search == "host":
                continue
            try:
                secs = float("nan")
                if search not in runs:
                    dec.search = search
                    runs[search], secs = decode_timed(dec, inputs, device)
                out[search] = dict(equal_counts(runs["host"], runs[search]), search_s=round(secs, 2))
            except Exception as e:  # noqa: BLE001
                out[search] = dict(error=error_of(e))
    finally:
        dec.search = own
    return out


def section_a(ctx) -> None:
    """Correctness: float16 batch 1 vs batch N on the device; float32 device vs float32 CPU."""
    sec = ctx.results.section("a")
    sec["status"] = "running"
    card = [dict(s, limit=token_limit(s["duration_s"], s["whole"], "card")) for s in ctx.distinct]
    segs = (stratified([s for s in card if s["kind"] == "clip"], ctx.p["correct_clips"])
            + stratified([s for s in card if s["kind"] != "clip"], ctx.p["correct_windows"]))
    inputs = inputs_of(segs)
    B = ctx.p["correct_b"]
    sec["settings"] = dict(segments=len(segs), batch=B, model=ctx.model_name, limits="card",
                           note="clips and windows of long recordings, the card's token limits whatever --limits "
                                "says (the comparison is batch against batch, at any limit); each batch of B is "
                                "filled by repeating its group's segments (one language and token limit a batch), "
                                "so it runs at batch B; random weights: near-ties in the logits flip more easily "
                                "than with trained weights, so this is a lower bound")
    dec = load(ctx, ctx.model, ctx.device, "float16", 1)
    decode_timed(dec, inputs[:1], ctx.device)  # warm-up
    one, t1 = decode_timed(dec, inputs, ctx.device)
    groups: dict = defaultdict(list)
    for i, x in enumerate(inputs):
        groups[(x.language, x.max_new_tokens)].append(i)
    filled, where = [], {}
    for idx in groups.values():
        for j in range(B):
            if j < len(idx):
                where[idx[j]] = len(filled)
            filled.append(inputs[idx[j % len(idx)]])
    dec.batch_size = B
    many, tb = decode_timed(dec, filled, ctx.device)
    wide = [many[where[i]] for i in range(len(inputs))]
    sec["float16_batch1_vs_batchB"] = dict(equal_counts(one, wide), batch1_s=round(t1, 2), batchB_s=round(tb, 2),
                                           differing=[dict(i=i, batch1=one[i].text[:80], batchB=wide[i].text[:80])
                                                      for i in range(len(inputs)) if one[i].text != wide[i].text][:5])
    # batch B, float16: do the copies inside one batch agree with each other (determinism within a batch)
    copies = defaultdict(set)
    for i, x in enumerate(filled):
        copies[id(x)].add(many[i].text)
    sec["float16_batchB_copies_agree"] = sum(len(v) == 1 for v in copies.values())
    for search, r in compare_searches(dec, filled, many, ctx.device).items():  # the torch engine's searches
        sec[f"float16_batchB_{search}_vs_host_search"] = dict(
            r, note="the same choices; ended windows' rows stay in the batch until dropped and the graphed "
                    "search's self-attention spans masked positions, so float16 products may differ in their "
                    "last bits")
    del dec
    free_memory(ctx.device)
    ctx.results.save()

    fsegs = sorted(segs, key=lambda s: s["limit"])[:ctx.p["fp32_n"]]  # the shortest limits: the CPU is slow
    finputs = inputs_of(fsegs)
    dev = load(ctx, ctx.model, ctx.device, "float32", 1)
    a32, ta = decode_timed(dev, finputs, ctx.device)
    for search, r in compare_searches(dev, finputs, a32, ctx.device).items():  # float32: the strict check
        sec[f"float32_{search}_vs_host_search"] = r
    del dev
    free_memory(ctx.device)
    import torch

    threads = torch.get_num_threads()
    cpu = load(ctx, ctx.model, "cpu", "float32", 1)
    c32, tc = decode_timed(cpu, finputs, "cpu")
    torch.set_num_threads(threads)
    del cpu
    sec["float32_device_vs_cpu"] = dict(equal_counts(a32, c32), device_s=round(ta, 2), cpu_s=round(tc, 2),
                                        cpu_threads=threads)
    sec["status"] = "done"
    ctx.results.save()


class ProcessorTimer:
    """Wall seconds inside generate()'s logits processors (all of them, and the n-gram ban alone), per run.

    The device is synchronised as the processors start, so the figure is their own time (the n-gram ban
    reads the tokens back to Python every step: it synchronises anyway, so this adds no wait)."""

    def __init__(self, device: str):
        self.device = device
        self.total = 0.0
        self.ngram = 0.0
        self.calls = 0

    def __enter__(self):
        from transformers.generation import logits_process as lp

        self._lp = lp
        self._list_call = lp.LogitsProcessorList.__call__
        from krasr_batch.engines import transformers as engine

        self._engine = engine
        self._ngram_call = lp.NoRepeatNGramLogitsProcessor.__call__
        self._ban_call = engine.NoRepeatNGramBan.__call__  # krasr-batch's own ban (the card's n-gram rule)
        timer = self

        def list_call(proc, input_ids, scores, **kw):
            sync(timer.device)
            t0 = time.perf_counter()
            try:
                return timer._list_call(proc, input_ids, scores, **kw)
            finally:
                timer.total += time.perf_counter() - t0
                timer.calls += 1

        def timed(original):
            def call(proc, input_ids, scores):
                t0 = time.perf_counter()
                try:
                    return original(proc, input_ids, scores)
                finally:
                    timer.ngram += time.perf_counter() - t0
            return call

        lp.LogitsProcessorList.__call__ = list_call
        lp.NoRepeatNGramLogitsProcessor.__call__ = timed(self._ngram_call)
        engine.NoRepeatNGramBan.__call__ = timed(self._ban_call)
        return self

    def __exit__(self, *exc):
        self._lp.LogitsProcessorList.__call__ = self._list_call
        self._lp.NoRepeatNGramLogitsProcessor.__call__ = self._ngram_call
        self._engine.NoRepeatNGramBan.__call__ = self._ban_call

    def summary(self) -> dict:
        return dict(processors_s=round(self.total, 2), no_repeat_ngram_s=round(self.ngram, 2), steps=self.calls)


def throughput_run(ctx, dec, inputs, secs: float, batch: int, label: dict, time_processors: bool = True) -> dict:
    import contextlib

    import torch

    dec.batch_size = batch
    calls, steps = generate_calls(inputs, batch, label.get("engine", ctx.engine))
    row = dict(label, batch=batch, segments=len(inputs), audio_s=round(secs, 1), generate_calls=calls,
               max_steps=steps)
    row["mean_batch"] = round(len(inputs) / row["generate_calls"], 1)
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        pt = ProcessorTimer(ctx.device) if time_processors else None
        with GpuSampler(ctx.device) as gs, (pt or contextlib.nullcontext()):
            out, wall = decode_timed(dec, inputs, ctx.device)
        walls = [wall]
        if ctx.budget.enough(1.3 * wall + 10):  # a second pass: the faster one is the figure, both are kept
            _, again = decode_timed(dec, inputs, ctx.device)
            walls.append(again)
            wall = min(walls)
    except Exception as e:  # noqa: BLE001 - OOM or an engine failure is a figure too
        row.update(status="failed", error=error_of(e), oom=is_oom(e))
        free_memory(ctx.device)
        return row
    row["pass_walls_s"] = [round(w, 3) for w in walls]
    toks = sum(o.num_tokens for o in out)
    row.update(status="done", wall_s=round(wall, 3), rtfx=round(secs / wall, 1), tokens=toks,
               tokens_per_s=round(toks / wall, 1), truncated=sum(o.truncated for o in out),
               ms_per_step=round(1000 * wall / max(1, steps), 2),
               **gs.summary(), **(pt.summary() if pt else {}))
    if ctx.device == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def section_b(ctx, phase: int = 1) -> None:
    """Model-stage throughput, eager (dynamic cache), float16 and bfloat16, SDPA, each batch size.

    Phase 1: the float16 runs up to the largest batch and the diagnostic run; phase 2 (after the peers, the
    CPU feed and the first compiled run): the rest."""
    sec = ctx.results.section("b")
    sec["status"] = "running"
    work = tiled(ctx.distinct, ctx.p["workload"])
    inputs = inputs_of(work)
    secs = audio_s(work)
    limits = defaultdict(int)
    for x in inputs:
        limits[x.max_new_tokens] += 1
    sec["settings"] = dict(model=ctx.model_name, beams=3, limits=ctx.policy, attention="sdpa",
                           segments=len(work), distinct_segments=len(ctx.distinct), audio_s=round(secs, 1),
                           token_limits={str(k): v for k, v in sorted(limits.items())},
                           workload="the corpus's planned segments (clips whole, long recordings in windows) "
                                    "repeated in order to the workload size; random weights decode up to each "
                                    "segment's token limit: the worst case for decoding length",
                           rtfx="audio seconds / wall seconds of the engine's decode() (log-mel, encoder, "
                                "beam search, quality signals) after one warm-up batch; the faster of two timed "
                                "passes where the budget allows (both in pass_walls_s): the machine is shared "
                                "and noisy")
    sec.setdefault("runs", [])
    plan = [(e, d, b, 4) for e, d, b in ctx.p["runs"]]
    base = engine_setting(ctx.engine)[0]  # phase 1: through --engine's last float16 row at its largest batch
    k = max((i for i, (e, d, b, _) in enumerate(plan)
             if engine_setting(e)[0] == base and d == "float16" and b == ctx.p["batches_max"]), default=len(plan) - 1)
    plan.insert(k + 1, (ctx.engine, "float16", ctx.p["diagnostic_batch"], 0))
    plan = plan[:k + 2] if phase == 1 else plan[k + 2:]
    decoders: dict = {}
    warm: set = set()
    oom_at: dict = {}
    last_wall = 0.0
    for engine, dtype, batch, ngram in plan:
        label = dict(engine=engine, dtype=dtype, batch=batch, cache="dynamic", compile=False,
                     no_repeat_ngram_size=ngram)
        if ngram == 0:
            label["note"] = "diagnostic, not the card's settings: no n-gram ban"
        if (engine, dtype) in oom_at and batch >= oom_at[engine, dtype]:
            sec["runs"].append(dict(label, status="skipped", reason=f"out of memory at batch {oom_at[engine, dtype]}"))
            continue
        if not ctx.budget.enough(max(20.0, 1.3 * last_wall)):
            sec["runs"].append(dict(label, status="skipped", reason="time budget"))
            ctx.results.save()
            continue
        base, search = engine_setting(engine)  # the torch engine's searches share one replica
        try:
            if (base, dtype) not in decoders:
                for old in list(decoders):
                    del decoders[old]
                warm.clear()
                free_memory(ctx.device)
                decoders[base, dtype] = load(ctx, ctx.model, ctx.device, dtype, batch, engine=base)
            dec = decoders[base, dtype]
            if hasattr(dec, "search"):  # the torch engine: this row's search, the host search for plain "torch"
                dec.search = search or "host"
            if (engine, dtype) not in warm:
                decode_timed(dec, inputs[:batch], ctx.device)  # warm-up: kernels, allocator
                warm.add((engine, dtype))
        except Exception as e:  # noqa: BLE001
            sec["runs"].append(dict(label, status="failed", error=error_of(e), oom=is_oom(e)))
            ctx.results.save()
            continue
        dec.options = dataclasses.replace(dec.options, no_repeat_ngram_size=ngram or 0)
        row = throughput_run(ctx, dec, inputs, secs, batch, label,
                             time_processors=ngram > 0 and engine == "transformers")
        dec.options = dataclasses.replace(dec.options, no_repeat_ngram_size=4)
        last_wall = row.get("wall_s") or last_wall
        if row.get("oom"):
            oom_at[engine, dtype] = batch
        sec["runs"].append(row)
        log.info("b %s", row)
        ctx.results.save()
    decoders.clear()
    free_memory(ctx.device)
    # where the stage's time goes outside the GPU: the CPU log-mel of one batch (WhisperFeatureExtractor)
    try:
        if phase != 1:
            raise StopIteration
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor.from_pretrained(ctx.model)
        batch = [x.audio for x in inputs[:64]]
        t0 = time.perf_counter()
        fe(batch, sampling_rate=SR, return_tensors="pt", return_attention_mask=True)
        sec["cpu_logmel_s"] = dict(segments=len(batch), seconds=round(time.perf_counter() - t0, 3),
                                   audio_s=round(sum(len(a) for a in batch) / SR, 1))
    except StopIteration:
        pass
    except Exception as e:  # noqa: BLE001
        sec["cpu_logmel_s"] = dict(error=error_of(e))
    done = [r for r in sec["runs"] if r.get("status") == "done" and r.get("no_repeat_ngram_size") != 0]
    sec["status"] = "done" if done else "failed"
    if done:
        best = max(done, key=lambda r: r["rtfx"])
        sec["best"] = {k: best[k] for k in ("engine", "dtype", "batch", "cache", "rtfx", "wall_s")}
    ctx.results.save()


def section_compile(ctx, phase: int = 1) -> None:
    """Section b's runs with a static cache (so generate() compiles the decoder step) at a few batch sizes;
    phase 1 the first of ``compile_runs``, phase 2 the rest."""
    sec = ctx.results.section("compile")
    sec["status"] = "running"
    work = tiled(ctx.distinct, min(ctx.p["workload"], ctx.p["compile_workload"]))  # transformers' generate(): slow
    inputs = inputs_of(work)
    secs = audio_s(work)
    sec["settings"] = dict(runs=[list(r) for r in ctx.p["compile_runs"]], cache_implementation="static",
                           max_cache_len=448, note="transformers compiles the decoder forward (mode reduce-overhead: "
                           "CUDA graphs) when the cache is static and the device is CUDA; elsewhere the static cache "
                           "runs eagerly. Warm-up: one full batch (compiles that shape); the timed pass over the "
                           "workload then includes any compile for the smaller last batch of each group; a second "
                           "timed pass runs when the budget allows, and the row reports the last pass")
    sec.setdefault("runs", [])
    runs = ctx.p["compile_runs"]
    for dtype, batch in (runs[:1] if phase == 1 else runs[1:]):
        if not ctx.budget.enough(90 if ctx.device == "cuda" else 5):
            sec["runs"].append(dict(dtype=dtype, batch=batch, status="skipped", reason="time budget"))
            ctx.results.save()
            continue
        row = dict(dtype=dtype, batch=batch, cache="static", compile=ctx.device == "cuda")
        try:
            # transformers' generate() compiles with a static cache; whatever --engine says
            dec = load(ctx, ctx.model, ctx.device, dtype, batch, engine="transformers")
            gcfg = dec.model.generation_config
            gcfg.cache_implementation = "static"
            gcfg.max_cache_len = 448  # one cache shape for every token limit: one compile a batch size
            t0 = time.perf_counter()
            decode_timed(dec, inputs[:batch], ctx.device)
            row["warmup_s"] = round(time.perf_counter() - t0, 1)
            ctx.results.save()
            passes = []
            for _ in range(2):
                if passes and not ctx.budget.enough(1.3 * passes[-1]["wall_s"] + 5):
                    break
                r = throughput_run(ctx, dec, inputs, secs, batch, row)
                passes.append(r)
                if r.get("status") != "done":
                    break
            row.update(passes[-1])
            row["pass_walls_s"] = [p.get("wall_s") for p in passes]
            del dec
        except Exception as e:  # noqa: BLE001 - a failure to compile is a figure too
            row.update(status="failed", error=error_of(e), trace=traceback.format_exc()[-1500:])
        free_memory(ctx.device)
        sec["runs"].append(row)
        log.info("compile %s", {k: v for k, v in row.items() if k != "trace"})
        ctx.results.save()
    sec["status"] = "done" if any(r.get("status") == "done" for r in sec["runs"]) else "failed"
    ctx.results.save()


def card_generate_kwargs(language: str, limit: int) -> dict:
    return dict(CARD, language=language, max_new_tokens=limit)


def section_c(ctx) -> None:
    """The peers on the same device and files: card pipeline at batch 1, chunked pipeline, faster-whisper."""
    import torch
    from transformers import pipeline

    from krasr_batch.engines.base import TOKEN_LIMIT_LONGEST, max_new_tokens_for

    sec = ctx.results.section("c")
    sec["status"] = "running"
    clips = stratified([f for f in ctx.corpus.files if f["kind"] == "clip"], ctx.p["peer_clips"])
    longs = [f for f in ctx.corpus.files if f["kind"] == "long"][:ctx.p["peer_long"]]
    files = clips + longs
    total = sum(f["duration_s"] for f in files)
    sec["settings"] = dict(files=len(files), clips=len(clips), long=len(longs), audio_s=round(total, 1),
                           dtype="float16" if ctx.device == "cuda" else "float32", model=ctx.model_name,
                           note="every peer and krasr-batch's row over the same files (clips spread over the "
                                "corpus and the first long recording), each with its own segmentation; card: the ASR "
                                "pipeline one file at a time, the card's duration-based max_new_tokens, "
                                "chunk_length_s=30 past 30 s; chunked: one pipeline call per language over "
                                "the files' audio, chunk_length_s=30, max_new_tokens=128 (the card's limit "
                                "for a full window); wall excludes model loading")
    sec["rows"] = []
    dtype = torch.float16 if ctx.device == "cuda" else torch.float32

    def add(row):
        sec["rows"].append(row)
        log.info("c %s", row)
        ctx.results.save()

    # krasr-batch on the same files (its planned segments), float16 batch 64: --engine's, the graphed search's,
    # --engine's with word timestamps, then transformers'
    inputs = None
    for engine, words in dict.fromkeys(((ctx.engine, False), ("torch-graphed", False), (ctx.engine, True),
                                        ("transformers", False))):
        name = f"krasr-batch ({ENGINE_NAMES[engine]}, batch 64{', word timestamps' if words else ''})"
        try:
            if inputs is None:  # the files' planned segments and audio, read once for both engines
                inputs = inputs_of(ctx.corpus.segments(files))
            dec = load(ctx, ctx.model, ctx.device, "float16" if ctx.device == "cuda" else "float32", 64, engine=engine,
                       words=words)
            decode_timed(dec, inputs[:2], ctx.device)
            with GpuSampler(ctx.device) as gs:
                _, wall = decode_timed(dec, inputs, ctx.device)
            add(dict(system=name, status="done", segments=len(inputs), wall_s=round(wall, 2),
                     rtfx=round(total / wall, 1), **gs.summary()))
            del dec
            free_memory(ctx.device)
        except Exception as e:  # noqa: BLE001
            add(dict(system=name, status="failed", error=error_of(e)))

    try:
        asr = pipeline("automatic-speech-recognition", model=ctx.model, device=ctx.device, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        add(dict(system="card pipeline", status="failed", error=error_of(e)))
        asr = None
    if asr is not None:
        def raw(f):
            return {"raw": ctx.corpus.audio[f["id"]], "sampling_rate": SR}

        if ctx.budget.enough(30):
            try:
                asr(raw(files[0]), generate_kwargs=card_generate_kwargs(files[0]["language"], 40))  # warm-up
                with GpuSampler(ctx.device) as gs:
                    sync(ctx.device)
                    t0 = time.perf_counter()
                    for f in files:
                        kw = dict(generate_kwargs=card_generate_kwargs(f["language"], max_new_tokens_for(f["duration_s"])))
                        if f["duration_s"] > CHUNK_LENGTH_S:
                            kw.update(chunk_length_s=CHUNK_LENGTH_S, batch_size=1)
                        asr(raw(f), **kw)
                    sync(ctx.device)
                    wall = time.perf_counter() - t0
                add(dict(system="card pipeline (batch 1)", status="done", wall_s=round(wall, 2),
                         rtfx=round(total / wall, 1), **gs.summary()))
            except Exception as e:  # noqa: BLE001
                add(dict(system="card pipeline (batch 1)", status="failed", error=error_of(e)))
        else:
            add(dict(system="card pipeline (batch 1)", status="skipped", reason="time budget"))
        by_lang = defaultdict(list)
        for f in files:
            by_lang[f["language"]].append(f)
        for b in ctx.p["chunk_batches"]:
            name = f"chunked pipeline (chunk_length_s=30, batch {b})"
            if not ctx.budget.enough(20):
                add(dict(system=name, status="skipped", reason="time budget"))
                continue
            try:
                with GpuSampler(ctx.device) as gs:
                    sync(ctx.device)
                    t0 = time.perf_counter()
                    for language, fs in by_lang.items():
                        list(asr([raw(f) for f in fs], chunk_length_s=CHUNK_LENGTH_S, batch_size=b,
                                 generate_kwargs=card_generate_kwargs(language, TOKEN_LIMIT_LONGEST)))
                    sync(ctx.device)
                    wall = time.perf_counter() - t0
                add(dict(system=name, status="done", wall_s=round(wall, 2), rtfx=round(total / wall, 1),
                         **gs.summary()))
            except Exception as e:  # noqa: BLE001
                add(dict(system=name, status="failed", error=error_of(e), oom=is_oom(e)))
                free_memory(ctx.device)
        del asr
        free_memory(ctx.device)
    add(faster_whisper_row(ctx, files, total))
    sec["status"] = "done"
    ctx.results.save()


def cuda12_probe() -> dict:
    """Whether this machine has the CUDA 12 cuBLAS and cuDNN 9 that CTranslate2 4.x wheels load at run time."""
    import ctypes
    import glob

    found = {}
    for lib in ("libcublas.so.12", "libcublasLt.so.12", "libcudnn.so.9", "libcublas.so.13"):
        try:
            ctypes.CDLL(lib)
            found[lib] = "loads"
        except OSError:
            hits = [p for d in sys.path if d for p in glob.glob(os.path.join(d, "nvidia", "*", "lib", lib))]
            found[lib] = f"not on the loader path; in site-packages: {hits[0]}" if hits else "absent"
    return found


def faster_whisper_row(ctx, files, total) -> dict:
    name = "faster-whisper (BatchedInferencePipeline, batch 16)"
    probe = cuda12_probe() if ctx.device == "cuda" else {}
    if not ctx.budget.enough(20):
        return dict(system=name, status="skipped", reason="time budget", probe=probe)
    try:
        import ctranslate2
    except ImportError as e:
        return dict(system=name, status="skipped", probe=probe,
                    reason=f"ctranslate2 is not installed here ({e}); its cp312 wheel is 43 MB and faster-whisper "
                           "needs PyAV (36 MB) at import, together over what one command carries (64 MiB with the "
                           "audio); and CTranslate2 4.x loads libcublas.so.12 (CUDA 12) at run time: "
                           + ", ".join(f"{k} {v}" for k, v in probe.items()))
    if ctx.device == "cuda" and ctranslate2.get_cuda_device_count() < 1:
        return dict(system=name, status="skipped", reason="CTranslate2 sees no CUDA device", probe=probe)
    try:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        from krasr_batch.engines import language_code, max_new_tokens_for
        from krasr_batch.engines.ctranslate2 import converted_model

        ct2_dir = converted_model(ctx.model, cache_dir=ctx.work / "ct2")
        model = WhisperModel(str(ct2_dir), device=ctx.device, compute_type="float16" if ctx.device == "cuda" else "float32")
        pipe = BatchedInferencePipeline(model)
        sync(ctx.device)
        t0 = time.perf_counter()
        for f in files:
            segments, _ = pipe.transcribe(ctx.corpus.audio[f["id"]], language=language_code(f["language"]),
                                          task="transcribe", beam_size=3, no_repeat_ngram_size=4,
                                          repetition_penalty=1.12, without_timestamps=True,
                                          condition_on_previous_text=False,
                                          max_new_tokens=max_new_tokens_for(f["duration_s"]), batch_size=16)
            list(segments)
        wall = time.perf_counter() - t0
        return dict(system=name, status="done", wall_s=round(wall, 2), rtfx=round(total / wall, 1), probe=probe)
    except Exception as e:  # noqa: BLE001 - CTranslate2's CUDA backend may not load: that is the finding
        return dict(system=name, status="failed", error=error_of(e), probe=probe)


def _feed_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from krasr_batch.segment import _vad_session

    _vad_session()


def _feed_task(path: str) -> dict:
    """Decode + resample + VAD + plan + cut one recording: krasr-batch's segment stage, as a worker runs it."""
    from krasr_batch.segment import analyse, segment_audio
    from krasr_batch.settings import SegmentOptions

    t0 = time.perf_counter()
    plan = analyse(path, SegmentOptions())
    t1 = time.perf_counter()
    n = sum(len(a) for a in segment_audio(plan))
    return dict(audio_s=plan.duration_s, analyse_s=t1 - t0, cut_s=time.perf_counter() - t1,
                segments=len(plan.segments), samples=n, backend=plan.backend)


def _feed_parts(path: str) -> dict:
    """One recording's stage split into its parts, in this process: decode+resample, VAD, plan, cut."""
    from krasr_batch.audio import DecodeReport, iter_audio
    from krasr_batch.segment import VadStream, plan_windows
    from krasr_batch.settings import SegmentOptions

    t0 = time.perf_counter()
    blocks = list(iter_audio(path, DecodeReport()))
    t1 = time.perf_counter()
    vad = VadStream()
    for b in blocks:
        vad.feed(b)
    probs, energy = vad.finish()
    t2 = time.perf_counter()
    windows, _ = plan_windows(probs, energy, vad.samples, SegmentOptions())
    t3 = time.perf_counter()
    audio = np.concatenate(blocks)
    cut = [np.concatenate([audio[s:e] for s, e in w]) for w in windows]
    t4 = time.perf_counter()
    return dict(file=os.path.basename(path), audio_s=round(vad.samples / SR, 1), decode_resample_s=round(t1 - t0, 3),
                vad_s=round(t2 - t1, 3), plan_s=round(t3 - t2, 3), cut_s=round(t4 - t3, 4), segments=len(cut))


def section_d(ctx) -> None:
    """The CPU feed: krasr-batch's segment stage over the long recordings in ``workers`` processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    sec = ctx.results.section("d")
    sec["status"] = "running"
    try:
        import soundfile  # noqa: F401

        import krasr_batch.segment  # noqa: F401 - soundfile, soxr, onnxruntime, silero-vad
    except Exception as e:  # noqa: BLE001
        ctx.results.skip("d", f"the segment stage cannot import here: {error_of(e)}")
        return
    longs = [ctx.data / f["original"] for f in ctx.corpus.files if f.get("original")]
    if not longs:
        ctx.results.skip("d", "no long recordings carried")
        return
    tasks = [str(longs[i % len(longs)]) for i in range(ctx.p["feed_tasks"])]
    workers = ctx.workers
    sec["settings"] = dict(workers=workers, cpu_count=os.cpu_count(), tasks=len(tasks),
                           files=[f"{p.name} ({describe_audio(p)})" for p in longs],
                           note="each task: krasr_batch.segment.analyse (decode with libsndfile, mix to mono, "
                                "resample with soxr to 16 kHz, Silero VAD on onnxruntime with 1 thread, plan) then "
                                "segment_audio (cut); the recordings repeated to give every worker work; "
                                "workers started and warmed (VAD session loaded) before the clock starts; no Ray")
    sec["parts"] = [_feed_parts(str(p)) for p in longs]
    ctx.results.save()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_feed_init) as ex:
        list(ex.map(_feed_task, [str(longs[0])] * workers))  # every worker started and warm
        t0 = time.perf_counter()
        rows = list(ex.map(_feed_task, tasks))
        wall = time.perf_counter() - t0
    total = sum(r["audio_s"] for r in rows)
    per_worker = total / wall / workers
    sec.update(status="done", audio_s=round(total, 1), wall_s=round(wall, 2),
               feed_x_realtime=round(total / wall, 1), per_worker_x_realtime=round(per_worker, 1),
               analyse_s_mean=round(float(np.mean([r["analyse_s"] for r in rows])), 3),
               cut_s_mean=round(float(np.mean([r["cut_s"] for r in rows])), 4),
               backends=sorted({r["backend"] for r in rows}))
    ctx.results.save()


def describe_audio(p: Path) -> str:
    try:
        import soundfile as sf

        i = sf.info(str(p))
        return f"{i.format} {i.samplerate} Hz, {i.channels} ch, {i.frames / i.samplerate:.0f} s"
    except Exception:  # noqa: BLE001
        return p.suffix


# ---------------------------------------------------------------------------------------------- report


def _f(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def render_markdown(doc: dict) -> str:
    s = doc["sections"]
    info = doc.get("info", {})
    lines = [f"### GPU check: {info.get('gpu') or info.get('device', '?')}", ""]
    lines += [f"- command: `{doc['command']}` (via `bash benchmarks/gpu_check.sh`)",
              f"- machine: {info.get('gpu', 'no GPU')} ({info.get('gpu_memory_gib', '?')} GiB); "
              f"{info.get('cpu', '?')}, {info.get('cpu_count', '?')} cores; Python {info.get('python', '?')}, "
              f"torch {info.get('torch', '?')} (CUDA {info.get('cuda', '—')}), transformers {info.get('transformers', '?')}",
              f"- model: {doc.get('model_name', '?')} (random weights, built on the machine: segments decode to their "
              f"token limit, the worst case for decoding length); beam 3, the card's settings; token limits: "
              f"{doc.get('limits', '?')}; krasr-batch's engine: {doc.get('engine', 'transformers')}; no Ray (the "
              "stages are measured directly)",
              f"- elapsed {doc.get('elapsed_s', '?')} s", ""]
    for name, title in (("a", "Correctness"), ("b", "Model-stage throughput (eager, dynamic cache)"),
                        ("compile", "Static cache + torch.compile"), ("c", "Peers, same device and files"),
                        ("d", "CPU feed")):
        sec = s[name]
        lines.append(f"**{title}** — {sec.get('status')}" + (f": {sec['reason']}" if sec.get("reason") else ""))
        lines.append("")
        if name == "a":
            for key, what in (("float16_batch1_vs_batchB", "float16 batch 1 vs batch "
                               f"{sec.get('settings', {}).get('batch', '?')}"),
                              ("float16_batchB_device_vs_host_search", "float16, the torch engine's device "
                               "search vs its host search"),
                              ("float16_batchB_graphed_vs_host_search", "float16, CUDA graphs vs the host search"),
                              ("float32_device_vs_cpu", "float32 device vs CPU"),
                              ("float32_device_vs_host_search", "float32, device search vs host search"),
                              ("float32_graphed_vs_host_search", "float32, CUDA graphs vs the host search")):
                r = sec.get(key)
                if r and "error" in r:
                    lines.append(f"- {what}: failed: {str(r['error'])[:200]}")
                elif r:
                    lines.append(f"- {what}: {r['equal_text']}/{r['segments']} equal texts ({r['equal_pct']} %), "
                                 f"mean common word prefix {r['mean_common_word_prefix']}")
        elif name in ("b", "compile"):
            runs = sec.get("runs") or []
            if runs:
                lines += ["| engine | dtype | cache | batch | mean batch | RTFx | wall s | ms/step | n-gram ban s "
                          "| GPU util % | peak GiB | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
                for r in runs:
                    note = r.get("error") or r.get("reason") or ""
                    if r.get("warmup_s") is not None:
                        note = f"warm-up {r['warmup_s']} s, passes {r.get('pass_walls_s')} s " + note
                    elif r.get("pass_walls_s") and len(r["pass_walls_s"]) > 1:
                        note = f"passes {r['pass_walls_s']} s " + note
                    if r.get("note"):
                        note = r["note"] + " " + note
                    lines.append(f"| {r.get('engine', 'transformers')} | {r.get('dtype')} | {r.get('cache', 'static' if name == 'compile' else 'dynamic')} | "
                                 f"{r.get('batch', '')} | {r.get('mean_batch', '')} | {_f(r.get('rtfx'))} | "
                                 f"{_f(r.get('wall_s'), '.2f')} | {_f(r.get('ms_per_step'), '.1f')} | "
                                 f"{_f(r.get('no_repeat_ngram_s'), '.2f')} | {_f(r.get('gpu_util_mean'))} | {_f(r.get('peak_mem_gib'), '.2f')} | {note[:120]} |")
                st = sec.get("settings", {})
                if name == "b" and st:
                    lines.append("")
                    lines.append(f"Workload: {st.get('segments')} segments, {st.get('audio_s')} s of audio, token limits "
                                 f"{st.get('token_limits')}. CPU log-mel of 64 segments: "
                                 f"{(sec.get('cpu_logmel_s') or {}).get('seconds', '—')} s.")
        elif name == "c":
            rows = sec.get("rows") or []
            if rows:
                st = sec.get("settings", {})
                lines += [f"Same {st.get('files')} files, {st.get('audio_s')} s of audio, {st.get('dtype')}.", "",
                          "| system | RTFx | wall s | GPU util % | note |", "|---|---|---|---|---|"]
                for r in rows:
                    lines.append(f"| {r['system']} | {_f(r.get('rtfx'))} | {_f(r.get('wall_s'), '.2f')} | "
                                 f"{_f(r.get('gpu_util_mean'))} | {(r.get('error') or r.get('reason') or '')[:300]} |")
        elif name == "d" and sec.get("status") == "done":
            lines.append(f"- {sec['settings']['workers']} worker processes ({sec['settings']['cpu_count']} cores): "
                         f"{sec['audio_s']} s of audio in {sec['wall_s']} s = **{sec['feed_x_realtime']}x real time**, "
                         f"{sec['per_worker_x_realtime']}x a worker")
            best = (s["b"].get("best") or {}).get("rtfx")
            cbest = max([r.get("rtfx") or 0 for r in (s["compile"].get("runs") or [])] + [best or 0])
            if cbest:
                lines.append(f"- cores one GPU needs at the best model-stage RTFx ({cbest}x): "
                             f"{math.ceil(cbest / sec['per_worker_x_realtime'])}")
            for p in sec.get("parts", []):
                lines.append(f"- {p['file']}: {p['audio_s']} s: decode+resample {p['decode_resample_s']} s, VAD "
                             f"{p['vad_s']} s, plan {p['plan_s']} s, cut {p['cut_s']} s (one process)")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


class Ctx:
    pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".gpu", help="what prepare wrote (plan.json, wav/, long/, model/)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu_check"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="a few segments, tiny-random: the dry run")
    ap.add_argument("--budget-s", type=float, default=390.0, help="skip what is left (with the reason) after this")
    ap.add_argument("--limits", choices=["card", "fit"], default="card", help="the token-limit policy (token_limit)")
    ap.add_argument("--model", help="a built model folder (default: build --variant under --work)")
    ap.add_argument("--variant", choices=sorted(SHAPES), help="default: small-random (tiny-random with --quick)")
    ap.add_argument("--work", default="/tmp/gpu_check_work")
    ap.add_argument("--engine", choices=sorted(ENGINE_NAMES), default="torch",
                    help="krasr-batch's engine in sections a and c and section b's main rows (GPUs' default: "
                         "torch); section b also runs the other's rows, the compile section is transformers'")
    ap.add_argument("--sections", default=",".join(("a", "b", "c", "d", "compile")))
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--runs", help="section b's runs as [engine:]dtype:batch, e.g. float16:64,transformers:float16:64")
    ap.add_argument("--compile-runs", help="the compile section's runs as dtype:batch, e.g. float16:64")
    ap.add_argument("--workload", type=int, help="section b's number of segments")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["prepare"]:
        ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check prepare")
        ap.add_argument("--corpus", required=True)
        ap.add_argument("--data", default=".gpu")
        ap.add_argument("--model-files", required=True, help="a model folder whose config/tokenizer files are copied")
        ap.add_argument("--clips", type=int, default=1000)
        ap.add_argument("--long", type=int, default=1000)
        a = ap.parse_args(argv[1:])
        plan = prepare(Path(a.corpus).expanduser(), Path(a.data), Path(a.model_files).expanduser(), a.clips, a.long)
        print(f"{len(plan['files'])} files, {sum(len(f['segments']) for f in plan['files'])} segments -> {a.data}")
        return 0
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # one warning a generate() call about max_length otherwise floods the log
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    ctx = Ctx()
    ctx.p = dict(QUICK if a.quick else FULL)
    pairs = lambda v: tuple((d, int(b)) for d, b in (x.split(":") for x in v.split(",") if x))  # noqa: E731
    if a.runs:  # engine:dtype:batch, or dtype:batch for --engine
        def run_of(x: str) -> tuple[str, str, int]:
            *engine, dtype, batch = x.split(":")
            return (engine[0] if engine else a.engine, dtype, int(batch))

        ctx.p["runs"] = tuple(run_of(x) for x in a.runs.split(",") if x)
    if a.compile_runs:
        ctx.p["compile_runs"] = pairs(a.compile_runs)
    mine = [b for e, d, b in ctx.p["runs"] if engine_setting(e)[0] == engine_setting(a.engine)[0] and d == "float16"]
    ctx.p["batches_max"] = max(mine) if mine else 0
    if a.workload:
        ctx.p["workload"] = a.workload
    ctx.results = Results(Path(a.out), argv)
    ctx.budget = Budget(a.budget_s)
    ctx.device, ctx.policy, ctx.workers, ctx.engine = a.device, a.limits, a.workers, a.engine
    ctx.data, ctx.work = Path(a.data), Path(a.work)
    ctx.work.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in a.sections.split(",") if s.strip()]
    doc = ctx.results.doc
    doc.update(engine=a.engine, limits=a.limits, quick=a.quick, budget_s=a.budget_s, params=ctx.p)
    try:
        import torch

        if a.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no CUDA device")
        doc["info"] = device_info(a.device)
        ctx.corpus = Corpus(ctx.data, a.limits)
        ctx.distinct = ctx.corpus.segments()
        doc["corpus"] = dict(files=len(ctx.corpus.files), segments=len(ctx.distinct),
                             audio_s=round(sum(f["duration_s"] for f in ctx.corpus.files), 1))
        variant = a.variant or ctx.p["model"]
        t0 = time.perf_counter()
        ctx.model = a.model or str(build_model(variant, ctx.data / "model", ctx.work / variant))
        ctx.model_name = Path(ctx.model).name if a.model else variant
        doc.update(model=ctx.model, model_name=ctx.model_name, model_build_s=round(time.perf_counter() - t0, 1))
        ctx.results.save()
    except Exception as e:  # noqa: BLE001 - nothing can be measured: say why in the JSON
        doc["fatal"] = error_of(e)
        doc["trace"] = traceback.format_exc()[-3000:]
        for s in SECTIONS:
            ctx.results.skip(s, f"setup failed: {doc['fatal']}")
        return 1
    runners = dict(a=section_a, b=section_b, c=section_c, d=section_d, compile=section_compile)
    for name, phase in ORDER:
        if name not in wanted:
            if phase == 1:
                ctx.results.skip(name, "not asked for (--sections)")
            continue
        if not ctx.budget.enough(15):
            if phase == 1:
                ctx.results.skip(name, f"time budget ({a.budget_s:.0f} s) spent")
            else:
                ctx.results.section(name).setdefault("notes", []).append("phase 2 skipped: time budget spent")
            continue
        log.info("section %s phase %d (%.0f s left)", name, phase, ctx.budget.left())
        t0 = time.perf_counter()
        try:
            if name in ("b", "compile"):
                runners[name](ctx, phase)
            else:
                runners[name](ctx)
        except Exception as e:  # noqa: BLE001 - one section failing must not lose the others
            sec = ctx.results.section(name)
            if phase == 2 and any(r.get("status") == "done" for r in sec.get("runs", [])):
                sec.update(status="done", phase2_error=error_of(e), trace=traceback.format_exc()[-3000:])
            else:
                sec.update(status="failed", error=error_of(e), trace=traceback.format_exc()[-3000:])
            log.exception("section %s failed", name)
            free_memory(ctx.device)
        sec = ctx.results.section(name)
        sec["section_s"] = round(sec.get("section_s", 0) + time.perf_counter() - t0, 1)
        ctx.results.save()
    doc["finished"] = True
    ctx.results.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
