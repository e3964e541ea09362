"""Speech detection with Silero VAD and the cutting of speech into model windows of at most 30 s.

The file is streamed once through the VAD (per 32 ms frame: speech probability and RMS energy; a quiet
file a second time, raised: ``quiet_gain_db``); the segment plan is a pure function of those frame values; the segment audio comes from the kept audio for
files up to ``KEEP_AUDIO_S`` long, and from a second decoding pass for longer ones, so memory does not
grow with recording length.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from krasr_batch.audio import SAMPLE_RATE, DecodeReport, decode_with_fallback, iter_audio
from krasr_batch.settings import SegmentOptions

log = logging.getLogger(__name__)

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees
VAD_BLOCK_FRAMES = 512  # frames per ONNX call
KEEP_AUDIO_S = 600.0  # files up to this long are kept in memory between VAD and cutting
# Where a window ends: at the longest pause of at least BREAK_MIN_PAUSE_S in its last fifth (the window then
# holds at least BREAK_FILL of max_segment_s), else at the longest pause in its second half. Every encoder
# pass costs the same 30 s whatever the window holds; on the archive set's long recordings windows held 23.4 s
# on average when they ended at the longest pause of their second half, 26.7 s with this rule (83 -> 73
# encoder passes; BENCHMARKS.md, issue 12).
BREAK_FILL = 0.8
BREAK_MIN_PAUSE_S = 0.3
VAD_PAD_MS = 30  # Silero's own padding of each speech span
# Quiet files. Silero VAD and Whisper both hear level: Whisper's log-mel features are absolute (a file 25 dB
# down reads as other features), and the VAD stops finding speech whose loudest 32 ms is below about
# -55 dBFS. Measured with whisper-base on the corpus's 20 Russian clips (loudest frames -10 to -14 dBFS)
# lowered by 25 / 35 / 50 dB: CER 55.0 / 59.8 / 82.0 % as they are (at -50 dB the VAD found 6.9 of 55 s of
# speech), 50.6 / 49.7 / 49.2 % raised (50.6 % at their own level; BENCHMARKS.md, "Quiet recordings"). So a file
# whose loudest frame is below QUIET_BELOW_DBFS is raised to put it at QUIET_TARGET_DBFS, by at most
# SegmentOptions.max_gain_db, for the VAD and the model alike; one at or below SILENT_DBFS is silence (a
# 16-bit file's dither), left as it is. Speech at an ordinary level is never touched: the card's input.
QUIET_BELOW_DBFS = -25.0
QUIET_TARGET_DBFS = -15.0
SILENT_DBFS = -90.0
# A loudest frame this far above the loudest level held over 3 of 5 frames is a click, not the speech's
# level (see file_level): 9.1 dB at most on the corpus recordings, 46 dB for a 1 ms click 45 dB above speech.
IMPULSE_GAP_DB = 20.0
IMPULSE_FRAMES = 5


def _silero_data() -> Path:
    """The folder of the ONNX models the silero-vad package ships.

    Found without importing the package: its ``__init__`` imports torch (about 2 s and 250 MB in each
    decode-and-segment worker), and nothing here needs torch.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("silero-vad is not installed (pip install silero-vad)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.lru_cache(maxsize=1)
def _vad_session():
    """The packaged Silero VAD ONNX model (no download), one onnxruntime session per process."""
    import onnxruntime as ort

    path = _silero_data() / "silero_vad_16k_sequence.onnx"
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def speech_timestamps(probs: Sequence[float], total_samples: int, threshold: float, min_speech_ms: int,
                      min_silence_ms: int, pad_ms: int) -> list[tuple[int, int]]:
    """Silero's state machine from frame probabilities to speech spans, [(start, end)] in samples at 16 kHz.

    The same result as silero-vad's ``get_speech_timestamps_from_probs`` with no limit on a span's length
    (krasr-batch cuts long speech itself, at its quietest frames): speech starts at a frame at or above
    ``threshold`` and ends after ``min_silence_ms`` below ``threshold - 0.15``; spans no longer than
    ``min_speech_ms`` are dropped; each span is padded by ``pad_ms``, or meets its neighbour halfway when
    the pause between them is shorter than twice that. silero-vad keeps that function in a module that
    imports torch; a test holds the two equal.
    """
    min_speech = SAMPLE_RATE * min_speech_ms / 1000
    min_silence = SAMPLE_RATE * min_silence_ms / 1000
    pad = SAMPLE_RATE * pad_ms / 1000
    neg = max(threshold - 0.15, 0.01)
    spans: list[list[int]] = []
    start, temp_end, triggered = 0, 0, False
    for i, p in enumerate(probs):
        cur = FRAME * i
        if p >= threshold and temp_end:
            temp_end = 0
        if p >= threshold and not triggered:
            triggered, start = True, cur
            continue
        if p < neg and triggered:
            if not temp_end:
                temp_end = cur
            if cur - temp_end < min_silence:
                continue
            if temp_end - start > min_speech:
                spans.append([start, temp_end])
            temp_end, triggered = 0, False
    if triggered and total_samples - start > min_speech:
        spans.append([start, total_samples])
    for i, span in enumerate(spans):
        if i == 0:
            span[0] = int(max(0, span[0] - pad))
        if i != len(spans) - 1:
            gap = spans[i + 1][0] - span[1]
            if gap < 2 * pad:
                span[1] += int(gap // 2)
                spans[i + 1][0] = int(max(0, spans[i + 1][0] - gap // 2))
            else:
                span[1] = int(min(total_samples, span[1] + pad))
                spans[i + 1][0] = int(max(0, spans[i + 1][0] - pad))
        else:
            span[1] = int(min(total_samples, span[1] + pad))
    return [(s, e) for s, e in spans]


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
    spans = speech_timestamps(probs.tolist(), total_samples, opts.vad_threshold, opts.min_speech_duration_ms,
                              opts.min_silence_duration_ms, VAD_PAD_MS)
    return [(s, e) for s, e in spans if e > s]


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


def plan_windows(probs: np.ndarray, energy: np.ndarray, total_samples: int,
                 opts: SegmentOptions) -> tuple[list[list[tuple[int, int]]], float]:
    """Turn per-frame VAD values into model windows, each a list of stretches of the source.

    Returns ([[(start, end), ...] per window] in samples, seconds of detected speech). A window's audio is
    its stretches back to back: a pause inside a window longer than ``opts.max_pause_s`` keeps
    ``max_pause_s`` of itself (half after the speech before it, half before the speech after it) and
    loses its middle, so a window holds up to ``max_segment_s`` of speech rather than of silence, and a
    recording with long pauses needs fewer windows (one encoder pass each). Every window's audio is at most
    ``opts.max_segment_s`` long; a window ends at the longest clear pause (``BREAK_MIN_PAUSE_S``) in its last
    fifth, else at the longest pause in its second half, and a stretch of speech with no pause is cut at its
    quietest frame. A file with any speech that
    fits in one window (``whole_file_max_s``) is decoded whole, as the model card's usage does.
    """
    spans = speech_spans(probs, total_samples, opts)
    return windows_from_spans(spans, energy, total_samples, opts), sum(e - s for s, e in spans) / SAMPLE_RATE


def windows_from_spans(spans: list[tuple[int, int]], energy: np.ndarray, total_samples: int,
                       opts: SegmentOptions) -> list[list[tuple[int, int]]]:
    """:func:`plan_windows` from the VAD's speech spans (:func:`speech_spans`): the windows only."""
    if not spans:
        return []
    if total_samples <= opts.whole_file_max_s * SAMPLE_RATE:
        return [[(0, total_samples)]]
    max_len = int(opts.max_segment_s * SAMPLE_RATE)
    keep = int(opts.max_pause_s * SAMPLE_RATE)
    min_pause = int(BREAK_MIN_PAUSE_S * SAMPLE_RATE)
    pieces: list[tuple[int, int]] = []
    for span in spans:
        pieces.extend(_split_long(span, energy, max_len))

    def gap(k: int) -> int:  # the pause after piece k
        return pieces[k + 1][0] - pieces[k][1]

    groups: list[tuple[int, int]] = []
    i = 0
    while i < len(pieces):
        j, length = i, pieces[i][1] - pieces[i][0]
        ends = [length]  # the window's audio length if it ended after piece i, i+1, ...
        while j + 1 < len(pieces) and length + min(gap(j), keep) + pieces[j + 1][1] - pieces[j + 1][0] <= max_len:
            length += min(gap(j), keep) + pieces[j + 1][1] - pieces[j + 1][0]
            j += 1
            ends.append(length)
        if j + 1 < len(pieces):  # must break somewhere in i..j: see BREAK_FILL
            full = [k for k in range(i, j + 1) if ends[k - i] >= max_len * BREAK_FILL and gap(k) >= min_pause]
            candidates = full or [k for k in range(i, j + 1) if ends[k - i] >= max_len // 2] or [j]
            j = max(candidates, key=lambda k: (gap(k), k))
        groups.append((i, j))
        i = j + 1

    windows: list[list[tuple[int, int]]] = []
    for i, j in groups:
        parts = [list(pieces[i])]
        for k in range(i, j):
            if gap(k) <= keep:  # a short pause stays whole: one stretch
                parts[-1][1] = pieces[k + 1][1]
            else:
                parts[-1][1] = pieces[k][1] + keep // 2
                parts.append([pieces[k + 1][0] - (keep - keep // 2), pieces[k + 1][1]])
        windows.append([(a, b) for a, b in parts])
    pad = int(opts.speech_pad_ms * SAMPLE_RATE / 1000)
    for n, parts in enumerate(windows):
        # padding comes out of the pauses beside a window, never the neighbour's speech; a pause goes
        # first to the window before it (speech ends fade out, onsets are sharp), windows never overlap
        prev_end = windows[n - 1][-1][1] if n else 0
        next_start = windows[n + 1][0][0] if n + 1 < len(windows) else total_samples
        room = max(0, max_len - sum(b - a for a, b in parts))
        s, e = parts[0][0], parts[-1][1]
        left = max(0, min(pad, s - prev_end, room // 2))
        right = max(0, min(pad, next_start - e, room - left))
        parts[0] = (s - left, parts[0][1])
        parts[-1] = (parts[-1][0], e + right)
    return windows


def plan_segments(probs: np.ndarray, energy: np.ndarray, total_samples: int,
                  opts: SegmentOptions) -> tuple[list[tuple[int, int]], float]:
    """:func:`plan_windows` as each window's (start, end) in the source, in samples; and the speech seconds."""
    windows, speech_s = plan_windows(probs, energy, total_samples, opts)
    return [(w[0][0], w[-1][1]) for w in windows], speech_s


@dataclass
class FilePlan:
    """One file after the VAD pass: where its segments lie, and (for short files) its audio."""

    path: str
    duration_s: float
    speech_s: float
    segments: list[tuple[int, int]]  # [(start, end)] in samples at 16 kHz: where each window lies in the source
    warnings: list[str] = field(default_factory=list)
    backend: str = "soundfile"
    audio: np.ndarray | None = None  # kept for files up to KEEP_AUDIO_S
    # each window's stretches of the source (its audio is them back to back); None: one stretch per window
    pieces: list[list[tuple[int, int]]] | None = None
    # the VAD's speech spans in the source ([(start, end)] in samples, Silero's 30 ms padding included);
    # None: not known (word times are then left as the model gives them)
    speech: list[tuple[int, int]] | None = None
    gain: float = 1.0  # what a quiet file's samples are multiplied by, for the VAD and the model (quiet_gain_db)

    def window_pieces(self, k: int) -> list[tuple[int, int]]:
        return self.pieces[k] if self.pieces is not None else [self.segments[k]]

    def window_speech(self, k: int) -> list[tuple[int, int]] | None:
        """The speech spans inside window ``k``'s span of the source (cut at its ends), in order."""
        if self.speech is None:
            return None
        s, e = self.segments[k]
        return [(max(a, s), min(b, e)) for a, b in self.speech if a < e and b > s]

    def audio_samples(self, k: int) -> int:
        """Length of window ``k``'s audio in samples (its span less the pauses it skips)."""
        return sum(e - s for s, e in self.window_pieces(k))

    @property
    def whole_file(self) -> bool:
        """The file is decoded whole, in one segment, as the model card's usage decodes a short clip."""
        return len(self.segments) == 1 and self.segments[0] == (0, round(self.duration_s * SAMPLE_RATE))


def loudest_dbfs(energy: np.ndarray) -> float:
    """The loudest frame's RMS level in dBFS (-inf for silence or no frames)."""
    loudest = float(energy.max()) if len(energy) else 0.0
    return float(20 * np.log10(loudest)) if loudest > 0 else -float("inf")


def sustained_dbfs(energy: np.ndarray) -> float:
    """The loudest level the file holds over 3 of 5 consecutive frames (about 0.1 s), in dBFS: its loudest
    frame, unless that stands alone (a median of 5 frames; a file of fewer frames: their median)."""
    if len(energy) < IMPULSE_FRAMES:
        return loudest_dbfs(np.array([np.median(energy)], np.float32)) if len(energy) else -float("inf")
    from numpy.lib.stride_tricks import sliding_window_view

    return loudest_dbfs(np.median(sliding_window_view(energy, IMPULSE_FRAMES), axis=1))


def file_level(energy: np.ndarray) -> tuple[float, float | None]:
    """(the level that decides whether a file is quiet, in dBFS; the level of a click set aside, or None).

    The loudest frame, as a rule; but frames standing more than IMPULSE_GAP_DB above the loudest sustained
    level (:func:`sustained_dbfs`) are a click, a pop or a bump, which say nothing of the speech's level: the
    loudest of the other frames decides then (a quiet recording with one 1 ms click at -1 dBFS was never
    raised). On every corpus recording the loudest frame stands at most 9.1 dB above the sustained level,
    so their levels are as before."""
    top = loudest_dbfs(energy)
    held = sustained_dbfs(energy)
    if not top - held > IMPULSE_GAP_DB:
        return top, None
    return loudest_dbfs(energy[energy <= 10 ** ((held + IMPULSE_GAP_DB) / 20)]), top


def quiet_gain_db(level: float, max_gain_db: float) -> float:
    """How many dB a file whose loudest frame is at ``level`` dBFS is raised by (0: none): see
    QUIET_BELOW_DBFS."""
    if max_gain_db <= 0 or not SILENT_DBFS < level < QUIET_BELOW_DBFS:
        return 0.0
    return round(float(min(max_gain_db, QUIET_TARGET_DBFS - level)), 1)


class _VadPass:
    """Consumes one decoding pass: feeds the VAD (the samples times ``gain``, within full scale: see
    :func:`segment_audio`), and keeps the audio of a file up to ``keep_audio_s`` (as decoded)."""

    def __init__(self, keep_audio_s: float, gain: float = 1.0):
        self.keep_audio_s = keep_audio_s
        self.gain = np.float32(gain)  # float32 samples stay float32 (the VAD takes nothing else)

    def __call__(self, blocks: Iterator[np.ndarray]) -> tuple[VadStream, list[np.ndarray] | None]:
        vad = VadStream()
        kept: list[np.ndarray] | None = []
        for block in blocks:
            vad.feed(np.clip(block * self.gain, -1.0, 1.0) if self.gain != 1.0 else block)
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
    warnings = report.warnings()
    level, click = file_level(energy)
    gain_db = quiet_gain_db(level, opts.max_gain_db)
    gain = 10 ** (gain_db / 20) if gain_db else 1.0
    if gain_db:  # the VAD again, on the raised samples: from memory, else a second decoding pass
        if kept is not None:
            vad = _VadPass(0.0, gain)(iter(kept))[0]
        else:
            vad = decode_with_fallback(path, _VadPass(0.0, gain))[1][0]
        probs, energy = vad.finish()
        aside = f" (a click at {click:.1f} dBFS aside)" if click is not None else ""
        warnings.append(f"quiet: its loudest moment is at {level:.1f} dBFS{aside}, raised "
                        f"{gain_db:.1f} dB for speech detection and the model")
    spans = speech_spans(probs, vad.samples, opts)
    windows = windows_from_spans(spans, energy, vad.samples, opts)
    speech_s = sum(e - s for s, e in spans) / SAMPLE_RATE
    audio = np.concatenate(kept) if kept else (np.zeros(0, np.float32) if kept is not None else None)
    return FilePlan(path, vad.samples / SAMPLE_RATE, speech_s, [(w[0][0], w[-1][1]) for w in windows],
                    warnings, report.backend, audio, windows, spans, gain)


def segment_audio(plan: FilePlan) -> Iterator[np.ndarray]:
    """Yield each planned window's samples in order (its stretches back to back); decodes the file a second
    time when it was not kept. A raised file's samples are held within full scale (±1): a quiet file's speech
    never reaches it (its loudest frame goes to -15 dBFS), but a click raised with it would stand 40 dB and
    more above the speech (on 20 Russian clips 45 dB down with one 1 ms click each, CER 53.6 % unclipped
    against 48.0 % clipped and 48.1 % with no click)."""
    for window in _windows(plan):
        if plan.gain != 1.0:
            window *= np.float32(plan.gain)
            np.clip(window, -1.0, 1.0, out=window)
        yield window


def _windows(plan: FilePlan) -> Iterator[np.ndarray]:
    """:func:`segment_audio`'s windows as decoded (each a new array)."""
    n = len(plan.segments)
    if plan.audio is not None:
        for k in range(n):
            yield _join([plan.audio[s:e] for s, e in plan.window_pieces(k)])
        return
    if not n:
        return
    backend = "pyav" if plan.backend == "pyav" else None
    buf = np.zeros(0, np.float32)
    offset = 0  # sample index of buf[0]
    k = 0
    for block in iter_audio(plan.path, DecodeReport(), backend=backend):
        buf = np.concatenate([buf, block])
        while k < n and offset + len(buf) >= plan.segments[k][1]:
            yield _join([buf[s - offset:e - offset] for s, e in plan.window_pieces(k)])
            k += 1
        keep_from = plan.segments[k][0] if k < n else offset + len(buf)
        drop = min(max(0, keep_from - offset), len(buf))  # never past what has been decoded so far
        buf, offset = buf[drop:], offset + drop
    while k < n:  # the second pass came out shorter: hand over what there is
        yield _join([buf[max(0, s - offset):max(0, e - offset)] for s, e in plan.window_pieces(k)])
        k += 1


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
