"""Speech detection with Silero VAD and the cutting of speech into model windows of at most 30 s.

The file is streamed once through the VAD (per 32 ms frame: speech probability and RMS energy); the
segment plan is a pure function of those frame values; the segment audio comes from the kept audio for
files up to ``KEEP_AUDIO_S`` long, and from a second decoding pass for longer ones, so memory does not
grow with recording length.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from krasr_batch.audio import SAMPLE_RATE, DecodeReport, decode_with_fallback, iter_audio
from krasr_batch.settings import SegmentOptions

log = logging.getLogger(__name__)

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees
VAD_BLOCK_FRAMES = 512  # frames per ONNX call
KEEP_AUDIO_S = 600.0  # files up to this long are kept in memory between VAD and cutting
VAD_PAD_MS = 30  # Silero's own padding of each speech span


def _import_silero():
    """Import silero_vad without letting it change torch's thread count (its model module sets 1)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    threads = torch.get_num_threads() if torch is not None else None
    import silero_vad.sequence_vad as sequence_vad
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    if torch is not None and threads:
        torch.set_num_threads(threads)
    return sequence_vad, get_speech_timestamps_from_probs


@functools.lru_cache(maxsize=1)
def _vad_session():
    """The packaged Silero VAD ONNX model (no download), one onnxruntime session per process."""
    from importlib import resources

    import onnxruntime as ort

    _import_silero()
    path = resources.files("silero_vad.data").joinpath("silero_vad_16k_sequence.onnx")
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class VadStream:
    """Feed 16 kHz mono audio in blocks of any size; collects per-frame speech probability and RMS energy."""

    def __init__(self) -> None:
        self.session = _vad_session()
        self.h = np.zeros((1, 1, 128), np.float32)
        self.c = np.zeros((1, 1, 128), np.float32)
        self.context = np.zeros(CONTEXT, np.float32)
        self.leftover = np.zeros(0, np.float32)
        self.probs: list[np.ndarray] = []
        self.energy: list[np.ndarray] = []
        self.samples = 0

    def feed(self, audio: np.ndarray) -> None:
        self.samples += len(audio)
        buf = np.concatenate([self.leftover, audio]) if len(self.leftover) else audio
        n = len(buf) // FRAME
        self.leftover = buf[n * FRAME:].copy()
        if n:
            self._run(buf[: n * FRAME].reshape(n, FRAME))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Flush the last partial frame (zero-padded, as Silero does); return (probs, energy) per frame."""
        if len(self.leftover):
            last = np.zeros((1, FRAME), np.float32)
            last[0, : len(self.leftover)] = self.leftover
            self.leftover = np.zeros(0, np.float32)
            self._run(last)
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.float32)  # noqa: E731
        return cat(self.probs), cat(self.energy)

    def _run(self, frames: np.ndarray) -> None:
        for i in range(0, len(frames), VAD_BLOCK_FRAMES):
            block = frames[i:i + VAD_BLOCK_FRAMES]
            ctx = np.empty((len(block), CONTEXT), np.float32)
            ctx[0] = self.context
            ctx[1:] = block[:-1, -CONTEXT:]
            self.context = block[-1, -CONTEXT:].copy()
            probs, self.h, self.c = self.session.run(
                ["speech_probs", "hn", "cn"], {"input": np.concatenate([ctx, block], axis=1), "h": self.h, "c": self.c})
            self.probs.append(np.asarray(probs, np.float32).reshape(-1))
            self.energy.append(np.sqrt(np.mean(np.square(block, dtype=np.float64), axis=1)).astype(np.float32))


def speech_spans(probs: np.ndarray, total_samples: int, opts: SegmentOptions) -> list[tuple[int, int]]:
    """Silero's own state machine over the frame probabilities: [(start, end)] in samples."""
    _, from_probs = _import_silero()
    spans = from_probs(
        probs.tolist(), sampling_rate=SAMPLE_RATE, threshold=opts.vad_threshold,
        min_speech_duration_ms=opts.min_speech_duration_ms, min_silence_duration_ms=opts.min_silence_duration_ms,
        speech_pad_ms=VAD_PAD_MS, audio_length_samples=total_samples)
    return [(int(s["start"]), int(s["end"])) for s in spans if s["end"] > s["start"]]


def _split_long(span: tuple[int, int], energy: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """Cut a stretch of speech longer than ``max_len`` samples at its quietest frames."""
    s, e = span
    out = []
    smooth = np.convolve(energy, np.ones(3, np.float32) / 3, mode="same") if len(energy) >= 3 else energy
    while e - s > max_len:
        lo = (s + max_len // 2) // FRAME + 1
        hi = min((s + max_len) // FRAME, len(smooth))  # the cut frame starts at most max_len after s
        if hi <= lo:
            cut = s + max_len
        else:
            window = smooth[lo:hi]
            k = int(np.flatnonzero(window == window.min())[-1])  # the latest of the quietest frames
            cut = (lo + k) * FRAME
        out.append((s, cut))
        s = cut
    out.append((s, e))
    return out


def plan_segments(probs: np.ndarray, energy: np.ndarray, total_samples: int,
                  opts: SegmentOptions) -> tuple[list[tuple[int, int]], float]:
    """Turn per-frame VAD values into model windows.

    Returns ([(start, end)] in samples, seconds of detected speech). Every window is at most
    ``opts.max_segment_s`` long; windows break at the longest pause available in the second half of a
    window, and a stretch of speech with no pause is cut at its quietest frame. A file with any speech
    that fits in one window (``whole_file_max_s``) is decoded whole, as the model card's usage does.
    """
    spans = speech_spans(probs, total_samples, opts)
    speech_s = sum(e - s for s, e in spans) / SAMPLE_RATE
    if not spans:
        return [], 0.0
    if total_samples <= opts.whole_file_max_s * SAMPLE_RATE:
        return [(0, total_samples)], speech_s
    max_len = int(opts.max_segment_s * SAMPLE_RATE)
    pieces: list[tuple[int, int]] = []
    for span in spans:
        pieces.extend(_split_long(span, energy, max_len))
    groups: list[tuple[int, int]] = []
    i = 0
    while i < len(pieces):
        start = pieces[i][0]
        j = i
        while j + 1 < len(pieces) and pieces[j + 1][1] - start <= max_len:
            j += 1
        if j + 1 < len(pieces):  # must break somewhere in i..j: at the longest pause in the window's second half
            candidates = [k for k in range(i, j + 1) if pieces[k][1] - start >= max_len // 2] or [j]
            j = max(candidates, key=lambda k: (pieces[k + 1][0] - pieces[k][1], k))
        groups.append((start, pieces[j][1]))
        i = j + 1
    pad = int(opts.speech_pad_ms * SAMPLE_RATE / 1000)
    out: list[tuple[int, int]] = []
    for n, (s, e) in enumerate(groups):
        # padding comes out of the pauses beside a window, never the neighbour's speech; a pause goes
        # first to the window before it (speech ends fade out, onsets are sharp), windows never overlap
        prev_end = out[-1][1] if out else 0
        next_start = groups[n + 1][0] if n + 1 < len(groups) else total_samples
        room = max(0, max_len - (e - s))
        left = max(0, min(pad, s - prev_end, room // 2))
        right = max(0, min(pad, next_start - e, room - left))
        out.append((s - left, e + right))
    return out, speech_s


@dataclass
class FilePlan:
    """One file after the VAD pass: where its segments lie, and (for short files) its audio."""

    path: str
    duration_s: float
    speech_s: float
    segments: list[tuple[int, int]]  # [(start, end)] in samples at 16 kHz
    warnings: list[str] = field(default_factory=list)
    backend: str = "soundfile"
    audio: np.ndarray | None = None  # kept for files up to KEEP_AUDIO_S

    @property
    def whole_file(self) -> bool:
        """The file is decoded whole, in one segment, as the model card's usage decodes a short clip."""
        return len(self.segments) == 1 and self.segments[0] == (0, round(self.duration_s * SAMPLE_RATE))


class _VadPass:
    """Consumes one decoding pass: feeds the VAD, and keeps the audio of a file up to ``keep_audio_s``."""

    def __init__(self, keep_audio_s: float):
        self.keep_audio_s = keep_audio_s

    def __call__(self, blocks: Iterator[np.ndarray]) -> tuple[VadStream, list[np.ndarray] | None]:
        vad = VadStream()
        kept: list[np.ndarray] | None = []
        for block in blocks:
            vad.feed(block)
            if kept is not None:
                kept.append(block)
                if vad.samples > self.keep_audio_s * SAMPLE_RATE:
                    kept = None
        return vad, kept


def analyse(path: str, opts: SegmentOptions, keep_audio_s: float = KEEP_AUDIO_S) -> FilePlan:
    """Decode the file once through the VAD and plan its segments. Raises AudioError for unusable files.

    The decoder is chosen by :func:`krasr_batch.audio.decode_with_fallback` (libsndfile, else PyAV).
    """
    report, (vad, kept) = decode_with_fallback(path, _VadPass(keep_audio_s))
    probs, energy = vad.finish()
    segments, speech_s = plan_segments(probs, energy, vad.samples, opts)
    audio = np.concatenate(kept) if kept else (np.zeros(0, np.float32) if kept is not None else None)
    return FilePlan(path, vad.samples / SAMPLE_RATE, speech_s, segments, report.warnings(), report.backend, audio)


def segment_audio(plan: FilePlan) -> Iterator[np.ndarray]:
    """Yield each planned segment's samples in order; decodes the file a second time when it was not kept."""
    if plan.audio is not None:
        for s, e in plan.segments:
            yield plan.audio[s:e]
        return
    if not plan.segments:
        return
    backend = "pyav" if plan.backend == "pyav" else None
    buf = np.zeros(0, np.float32)
    offset = 0  # sample index of buf[0]
    k = 0
    for block in iter_audio(plan.path, DecodeReport(), backend=backend):
        buf = np.concatenate([buf, block])
        while k < len(plan.segments) and offset + len(buf) >= plan.segments[k][1]:
            s, e = plan.segments[k]
            yield buf[s - offset:e - offset].copy()
            k += 1
        keep_from = plan.segments[k][0] if k < len(plan.segments) else offset + len(buf)
        drop = max(0, keep_from - offset)
        buf, offset = buf[drop:], offset + drop
    while k < len(plan.segments):  # the second pass came out shorter: hand over what there is
        s, e = plan.segments[k]
        yield buf[max(0, s - offset):max(0, e - offset)].copy()
        k += 1
