"""Audio input: open any file, decode it in blocks, mix down to mono and resample to 16 kHz with soxr.

soundfile (libsndfile) is tried first; PyAV (FFmpeg) reads what libsndfile cannot (m4a/AAC, MP4 video, Opus, ...).
Decoders under-read without raising, so the decoded length is compared with what the header declares.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from krasr_batch.shards import RowAudio, ShardRowError, parse_ref, read_row_audio, resolve_beside
from krasr_batch.storage import is_uri, os_path, printable_path

log = logging.getLogger(__name__)
T = TypeVar("T")

SAMPLE_RATE = 16000  # Hz, what Whisper and Silero VAD take
BLOCK_S = 20.0  # seconds of source audio decoded per block
SHORT_TOLERANCE_S = 0.1  # decoded audio may fall short of the header by this much without a warning
MIN_TRUNCATED_S = 1.0  # a truncated file with less than this left is an error, not a warning


class AudioError(Exception):
    """A file that cannot be turned into audio. ``kind`` is a short machine-readable cause."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class DecodeReport:
    """What decoding found beyond the samples: filled in while the stream is consumed."""

    backend: str = ""
    source_rate: int = 0
    channels: int = 0
    declared_s: float | None = None
    decoded_s: float = 0.0
    nonfinite_samples: int = 0
    gap_s: float = 0.0  # corrupt stretches replaced by silence
    inverted: dict[int, float] = field(default_factory=dict)  # channel (from 1) -> seconds mixed in inverted

    @property
    def short(self) -> bool:
        """Decoded noticeably less audio than the header declares."""
        return self.declared_s is not None and \
            self.decoded_s < self.declared_s - max(SHORT_TOLERANCE_S, 0.01 * self.declared_s)

    def warnings(self) -> list[str]:
        w = []
        if self.short:
            w.append(f"truncated: decoded {self.decoded_s:.2f} s of the {self.declared_s:.2f} s the header declares")
        if self.nonfinite_samples:
            w.append(f"nonfinite: {self.nonfinite_samples} NaN/inf samples replaced by silence")
        if self.gap_s > 0:
            w.append(f"corrupt stream: {self.gap_s:.2f} s of undecodable audio replaced by silence")
        if self.inverted:
            if len(self.inverted) == 1:
                (c, sec), = self.inverted.items()
                which = f"channel {c} of {self.channels} for {sec:.1f} s"
            else:
                which = "channels " + ", ".join(f"{c} ({sec:.1f} s)" for c, sec in sorted(self.inverted.items())) \
                    + f" of {self.channels}"
            w.append(f"phase: {which} in opposite phase to the loudest, inverted before the mix-down "
                     "(a plain average cancels the speech)")
        return w


def check_path(path: str, input_root: str | None = None) -> None:
    """Raise AudioError for a local path that cannot be read as a file (before any decoder sees it).

    A dataset shard's row (``SHARD.parquet#row=N``, :mod:`krasr_batch.shards`): the shard is checked as a
    file, then the row for audio bytes (or, where the dataset stores none, the file its ``path`` names)."""
    ref = parse_ref(path)
    if ref is not None:
        check_path(ref[0], input_root)
        row = _shard_row(path, ref)
        if row.data is None:
            if not row.path:
                raise AudioError("no_audio", f"neither audio bytes nor a path in {path}")
            check_path(resolve_beside(ref[0], row.path), input_root)
        elif not row.data:
            raise AudioError("empty_file", f"zero audio bytes in {path}")
        return
    if is_uri(path):
        if input_root is not None and not path.startswith(input_root.rstrip("/") + "/"):
            raise AudioError("outside_input_root", f"{path} is outside --input-root {input_root}")
        _check_object(path)
        return
    local = os_path(path)
    try:
        real = os.path.realpath(local, strict=True)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AudioError("symlink_loop", f"symbolic link loop: {path}") from e
        if e.errno == errno.ENOENT:
            if os.path.islink(local):
                target = printable_path(os.readlink(local))
                raise AudioError("not_found", f"a symbolic link to nothing: {path} -> {target}") from e
            raise AudioError("not_found", f"no such file: {path}") from e
        raise AudioError("unreadable", f"cannot resolve {path}: {e.strerror}") from e
    if input_root is not None:
        root = os.path.realpath(input_root)
        if os.path.commonpath([root, real]) != root:
            raise AudioError("outside_input_root",
                             f"{path} resolves to {printable_path(real)}, outside --input-root {root}")
    if os.path.isdir(real):
        raise AudioError("not_a_file", f"a directory, not an audio file: {path}")
    if not os.path.isfile(real):
        raise AudioError("not_a_file", f"not a regular file: {path}")
    if not os.access(real, os.R_OK):
        raise AudioError("permission_denied", f"permission denied: {path}")
    if os.path.getsize(real) == 0:
        raise AudioError("empty_file", f"zero-byte file: {path}")


def _check_object(uri: str) -> None:
    """The object-storage twin of the local checks: missing, a prefix rather than an object, empty."""
    from pyarrow.fs import FileType

    from krasr_batch.storage import UnsupportedURI, filesystem

    try:
        fs, p = filesystem(uri)
        info = fs.get_file_info(p)
    except UnsupportedURI as e:
        raise AudioError("unsupported_uri", f"{e}: {uri}") from e
    except FileNotFoundError as e:
        raise AudioError("not_found", f"no such object (or nothing serves it): {uri}") from e
    except Exception as e:  # noqa: BLE001 - network errors come as OSError, aiohttp and fsspec errors
        raise AudioError("unreachable", f"cannot reach {uri}: {e}") from e
    if info.type == FileType.NotFound:
        raise AudioError("not_found", f"no such object (or nothing serves it): {uri}")
    if info.type != FileType.File:
        raise AudioError("not_a_file", f"not an object (a prefix or directory): {uri}")
    if info.size == 0:
        raise AudioError("empty_file", f"zero-byte object: {uri}")


def _shard_row(path: str, ref: tuple[str, int]) -> RowAudio:
    try:
        return read_row_audio(*ref)
    except ShardRowError as e:
        raise AudioError("not_found", f"{e}: {path}") from e
    except (OSError, ValueError) as e:  # unreadable or not Parquet (ArrowInvalid)
        raise AudioError("unreadable", f"cannot read the dataset shard of {path}: {e}") from e


def _open_binary(path: str):
    ref = parse_ref(path)
    if ref is not None:  # a dataset shard's row: its bytes, decoded from memory
        row = _shard_row(path, ref)
        if row.data is not None:
            return io.BytesIO(row.data)
        return _open_binary(resolve_beside(ref[0], row.path or ""))
    if is_uri(path):
        from krasr_batch.storage import open_input_file

        return open_input_file(path)
    try:
        return open(os_path(path), "rb")
    except PermissionError as e:
        raise AudioError("permission_denied", f"permission denied: {path}") from e
    except OSError as e:
        raise AudioError("unreadable", f"cannot open {path}: {e.strerror}") from e


def wav_declared_frames(head: bytes) -> int | None:
    """Frames a RIFF/WAVE header says its data chunk holds (libsndfile reports what the file holds instead)."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(head):
        cid, size = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if cid == b"fmt " and pos + 22 <= len(head):
            block_align = struct.unpack_from("<H", head, pos + 20)[0]
        elif cid == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


ANTIPHASE_CORR = -0.5  # a channel correlated below this with a block's loudest one is mixed in inverted


def _mono(block: np.ndarray, report: DecodeReport, rate: int) -> np.ndarray:
    """(frames, channels) or (frames,) float -> (frames,) float32: the channel average, phase-aligned.

    A channel in opposite phase to the block's loudest (a swapped pair of wires, a phone line's balanced
    leg) would cancel it in a plain average, and its speech with it; such a channel (correlation below
    :data:`ANTIPHASE_CORR`, over the speech band) is inverted before averaging, and ``report`` counts the
    seconds it was."""
    if block.ndim == 2:
        block = block[:, 0] if block.shape[1] == 1 else block @ _mix_weights(block, report, rate)
    return np.ascontiguousarray(block, dtype=np.float32)


def _mix_weights(block: np.ndarray, report: DecodeReport, rate: int) -> np.ndarray:
    """Each channel's weight in the mix: 1/channels, negated for a channel in opposite phase to the loudest.

    (A product with these weights is also ten times faster than ``mean(axis=1)`` over a few channels.)"""
    n = block.shape[1]
    weights = np.full(n, 1.0 / n, dtype=block.dtype)
    # the correlations of the first differences: speech's band, not mains hum or rumble, which a channel
    # may carry in opposite phase under speech in phase (a difference takes 50 Hz down 30 dB or more)
    d = np.diff(block, axis=0)
    gram = (d.T @ d).astype(np.float64)  # channels x channels: energies on the diagonal, cross-products off it
    energy = np.diag(gram)
    ref = int(np.argmax(energy))
    if not energy[ref] > 0:
        return weights
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = gram[ref] / np.sqrt(energy[ref] * energy)
    flip = corr < ANTIPHASE_CORR  # NaN (a block holding NaN samples, a silent channel) compares False
    weights[flip] = -weights[flip]
    for c in np.flatnonzero(flip):
        report.inverted[int(c) + 1] = report.inverted.get(int(c) + 1, 0.0) + len(block) / rate
    return weights


def _soundfile_blocks(path: str, report: DecodeReport, block_s: float) -> Iterator[np.ndarray]:
    import soundfile as sf

    fh = _open_binary(path)
    try:
        head = fh.read(1 << 16)
        fh.seek(0)
        try:
            f = sf.SoundFile(fh)
        except Exception as e:  # libsndfile: format not recognised, malformed header, ...
            raise _NotForSoundfile(str(e)) from e
        with f:
            report.backend, report.source_rate, report.channels = "soundfile", f.samplerate, f.channels
            declared = wav_declared_frames(head) if f.format in ("WAV", "WAVEX", "RF64") else (f.frames if f.frames > 0 else None)
            if declared is not None:
                report.declared_s = declared / f.samplerate
            blocksize = max(1, int(block_s * f.samplerate))
            while True:
                block = f.read(blocksize, dtype="float32", always_2d=True)
                if not len(block):
                    break
                yield _mono(block, report, f.samplerate)
    finally:
        fh.close()


class _NotForSoundfile(Exception):
    pass


def _pyav_header(container, stream, path: str, report: DecodeReport) -> int:
    """What the audio stream's header says (rate, channels, declared length) into ``report``; returns the rate."""
    rate = stream.rate or stream.codec_context.sample_rate
    if not rate:
        raise AudioError("undecodable", f"audio stream without a sample rate: {path}")
    report.backend, report.source_rate = "pyav", rate
    report.channels = stream.channels if hasattr(stream, "channels") else stream.codec_context.channels
    if stream.duration is not None and stream.time_base is not None:
        report.declared_s = float(stream.duration * stream.time_base)
    elif container.duration:
        report.declared_s = container.duration / 1e6
    return rate


def _pyav_blocks(path: str, report: DecodeReport, block_s: float) -> Iterator[np.ndarray]:
    import av

    fh = _open_binary(path)
    try:
        try:  # metadata is not ours to read: a tag in a local code page (cp1251) must not fail the audio
            container = av.open(fh, mode="r", metadata_errors="replace")
        except av.error.FFmpegError as e:
            raise AudioError("undecodable", f"not a readable audio file ({e.strerror or type(e).__name__}): {path}") from e
        except (ValueError, OverflowError) as e:  # PyAV reading a header of random bytes as fields
            raise AudioError("undecodable", f"not a readable audio file ({type(e).__name__}: {e}): {path}") from e
        with container:
            if not container.streams.audio:
                raise AudioError("no_audio_stream", f"no audio stream in {path}")
            stream = container.streams.audio[0]
            rate = _pyav_header(container, stream, path, report)
            pending: list[np.ndarray] = []  # (n, channels) frames, mixed down a block at a time
            pending_n, position = 0, 0  # position: samples emitted, at the source rate
            start_pts = None
            block = int(block_s * rate)
            bad_packets = 0
            for frame in _frames(container, stream, path):
                if frame is None:  # a packet the decoder rejected: skip it, the timeline is kept below
                    bad_packets += 1
                    if bad_packets > MAX_BAD_PACKETS and position == 0:
                        raise AudioError("undecodable", f"cannot decode {path}: no valid audio packets")
                    continue
                arr = frame.to_ndarray()
                if arr.dtype.kind == "i":
                    arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
                n_ch = len(frame.layout.channels)
                arr = arr.T if frame.format.is_planar else arr.reshape(-1, n_ch)  # -> (n, channels)
                if pending and pending[-1].shape[1] != n_ch:  # the layout changed mid-stream
                    yield _mono(np.concatenate(pending), report, rate)
                    pending, pending_n = [], 0
                if frame.pts is not None and frame.time_base is not None:
                    at = int(round(float(frame.pts * frame.time_base) * rate))
                    if start_pts is None:
                        start_pts = at
                    gap = at - start_pts - position
                    if gap > int(0.05 * rate):  # frames were skipped: keep the timeline with silence
                        report.gap_s += gap / rate
                        pending.append(np.zeros((gap, n_ch), np.float32))
                        pending_n += gap
                        position += gap
                pending.append(arr)
                pending_n += len(arr)
                position += len(arr)
                if pending_n >= block:
                    yield _mono(np.concatenate(pending), report, rate)
                    pending, pending_n = [], 0
            if position == 0 and bad_packets:
                raise AudioError("undecodable", f"cannot decode {path}: every audio packet was rejected")
            if pending:
                yield _mono(np.concatenate(pending), report, rate)
    finally:
        fh.close()


MAX_BAD_PACKETS = 50  # rejected packets before any audio: not an audio file after all


def _frames(container, stream, path: str):
    """Decoded frames of one stream, packet by packet; None for a packet the decoder rejects."""
    import av

    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.FFmpegError as e:
            log.debug("%s: skipping a corrupt packet at %s: %s", path, packet.pts, e)
            yield None
            continue
        yield from frames
    try:  # flush the decoder
        yield from stream.codec_context.decode(None)
    except av.error.FFmpegError:
        pass


def iter_audio(path: str, report: DecodeReport | None = None, block_s: float = BLOCK_S,
               backend: str | None = None) -> Iterator[np.ndarray]:
    """Yield the file as 16 kHz mono float32 blocks (about ``block_s`` seconds each).

    Raises AudioError when nothing can be decoded. NaN/inf samples become 0. ``report`` (optional) collects
    what was declared and what was decoded, for the caller's warnings.
    """
    report = report if report is not None else DecodeReport()
    if backend in (None, "soundfile"):
        try:
            gen = _soundfile_blocks(path, report, block_s)
            first = next(gen, None)
            if first is not None:
                yield from _resampled(_chain(first, gen), report)
                return _finish(path, report)
            if backend == "soundfile":
                raise AudioError("no_audio", f"no audio frames decoded from {path}")
        except _NotForSoundfile:
            if backend == "soundfile":
                raise AudioError("undecodable", f"libsndfile cannot read {path}") from None
        except AudioError:
            raise
        except Exception as e:  # noqa: BLE001 - a decoder failure mid-file; PyAV gets a try from the start
            raise SoundfileFailed(str(e)) from e
    report.__init__()
    yield from _resampled(_pyav_blocks(path, report, block_s), report)
    _finish(path, report)


class SoundfileFailed(Exception):
    """libsndfile failed part-way through a file: decode it again from the start with ``backend="pyav"``."""


def _chain(first, rest):
    yield first
    yield from rest


def _resampled(blocks: Iterator[np.ndarray], report: DecodeReport) -> Iterator[np.ndarray]:
    stream = None
    n_in = 0
    for block in blocks:
        bad = ~np.isfinite(block)
        if bad.any():
            report.nonfinite_samples += int(bad.sum())
            block = np.where(bad, 0.0, block).astype(np.float32)
        n_in += len(block)
        if report.source_rate == SAMPLE_RATE:
            out = block
        else:
            if stream is None:
                import soxr  # here, so that importing SAMPLE_RATE needs no audio library

                stream = soxr.ResampleStream(report.source_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            out = stream.resample_chunk(block, last=False)
        if len(out):
            yield out
    report.decoded_s = n_in / report.source_rate if report.source_rate else 0.0
    if stream is not None:
        tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
        if len(tail):
            yield tail


def _finish(path: str, report: DecodeReport) -> None:
    if report.decoded_s <= 0:
        raise AudioError("no_audio", f"no audio decoded from {path}")
    if (report.declared_s is not None and report.decoded_s < MIN_TRUNCATED_S
            and report.decoded_s < report.declared_s - max(SHORT_TOLERANCE_S, 0.01 * report.declared_s)):
        raise AudioError("truncated", f"truncated: the header declares {report.declared_s:.2f} s but only "
                                      f"{report.decoded_s:.3f} s could be decoded from {path}")


def decode_with_fallback(path: str, consume: Callable[[Iterator[np.ndarray]], T], report: DecodeReport | None = None,
                         retry_short: bool = True) -> tuple[DecodeReport, T]:
    """The one place that chooses the decoder: ``consume`` runs over the file's 16 kHz blocks.

    libsndfile is tried first (PyAV takes over at once for what libsndfile cannot open, see
    :func:`iter_audio`). Where it fails part-way, PyAV decodes the file again from the start. Where it stops
    short of what the header declares (its MPEG decoder gives up at the first corrupt stretch) and
    ``retry_short``, PyAV decodes the file again too, and whichever got more audio is used; PyAV
    resynchronises after corrupt frames and keeps the timeline with silence. Returns the report of the pass
    used (``report``, filled in, when given) and what ``consume`` returned for it.
    """
    report = report if report is not None else DecodeReport()
    try:
        result = consume(iter_audio(path, report))
    except SoundfileFailed as e:
        log.info("%s: libsndfile failed part-way (%s); decoding again with PyAV", path, e)
        report.__init__()
        return report, consume(iter_audio(path, report, backend="pyav"))
    if retry_short and report.backend == "soundfile" and report.short:
        retry_report = DecodeReport()
        try:
            retry = consume(iter_audio(path, retry_report, backend="pyav"))
        except AudioError:
            return report, result
        if retry_report.decoded_s > report.decoded_s + SHORT_TOLERANCE_S:
            log.info("%s: PyAV decoded %.1f s where libsndfile stopped at %.1f s", path,
                     retry_report.decoded_s, report.decoded_s)
            report.__dict__.update(retry_report.__dict__)
            return report, retry
    return report, result


def load_audio(path: str, report: DecodeReport | None = None) -> np.ndarray:
    """The whole file as one 16 kHz mono float32 array (for short files and tests).

    As it always has, it keeps libsndfile's audio of a file it reads short (``retry_short=False``)."""
    _, blocks = decode_with_fallback(path, list, report, retry_short=False)
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
