"""A synthetic Kazakh / Russian / mixed speech corpus with reference texts, for tests and benchmarks.

Speech comes from espeak-ng; containers, rates and channel layouts from sox and ffmpeg (Debian packages
``espeak-ng sox ffmpeg``); numpy and soundfile do the rest. :func:`build_corpus` writes into ``out``:

- ``clips/{category}_{i:03d}.{ext}``: one utterance per sentence of :mod:`krasr_batch.testing.sentences`,
  cycling through :data:`FORMATS` (16 kHz wav, 44.1 kHz stereo flac, 22.05 kHz ogg, 48 kHz mp3, 8 kHz wav);
- ``long/long_{k:02d}.{ext}``: ``long`` recordings of at least ``long_minutes`` each, clips drawn at random
  with pauses of 0.15 to 8 s between them, a silent lead-in and a faint hiss;
- ``bad/``: inputs that must be reported as errors or handled (empty, truncated, random bytes, text, silence,
  a tenth of a second, NaN samples, six channels, speech between long silences, a directory, a unicode name);
- ``clips.jsonl`` (id, path, language, category, text), ``long.jsonl`` (same and ``duration_s``),
  ``spans.jsonl`` (id, start_s, end_s, text of each sentence of a long recording), ``bad.jsonl``
  (id, path, expect: ``error``, ``ok``, ``ok-empty`` or ``ok-or-error``, note);
- ``BUILT``, written last, with the build's parameters.

Paths in the manifests are relative to ``out``. ``language`` is the Whisper language to decode with
(``russian`` for Russian speech, ``kazakh`` for Kazakh and mixed speech, as the KRASR model card advises);
``category`` is kk, ru or mixed.

Determinism: one ``random.Random(seed)`` draws, in this order, each clip's voice speed and pitch and the pauses
inside mixed sentences, then each long recording's lead-in, clips and pauses, then the random bytes of a bad
input; the hiss of long recording ``k`` comes from ``numpy.random.default_rng(seed * 1000 + k)``. sox runs in
repeatable mode (``-R``: its dither and the Ogg stream serial number are seeded) and float wavs carry no
timestamp, so the same seed and the same tool versions give byte-identical files. The layout, names and draw order are those of the corpus the tests
were first written against.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000  # Hz, of every synthesized array
#: format name -> file extension; clip i is written in format i % 5, long recording k in LONG_FORMATS[k % 3]
FORMATS = {"wav16k": ".wav", "flac44st": ".flac", "ogg22": ".ogg", "mp348": ".mp3", "wav8k": ".wav"}
LONG_FORMATS = ("flac44st", "mp348", "wav16k")
LANGUAGE = {"ru": "russian", "kk": "kazakh", "mixed": "kazakh"}
PAUSES_S = (0.15, 0.3, 0.6, 1.0, 2.0, 4.0, 8.0)  # between sentences of a long recording
TOOLS = ("espeak-ng", "sox", "ffmpeg")


@dataclass(frozen=True)
class Utterance:
    """One synthesized sentence: its category (ru, kk, mixed), its (voice, text) parts, 16 kHz mono float32."""

    category: str
    parts: tuple[tuple[str, str], ...]
    audio: np.ndarray

    @property
    def text(self) -> str:
        return " ".join(t for _, t in self.parts)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SR


def check_tools() -> None:
    """Raise RuntimeError naming the Debian packages when a command-line tool is missing."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: apt-get install espeak-ng sox ffmpeg")


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


def sentences() -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """(category, parts) of every clip, in clip order."""
    from krasr_batch.testing import sentences as s

    return ([("ru", (("ru", t),)) for t in s.RU] + [("kk", (("kk", t),)) for t in s.KK]
            + [("mixed", tuple(p)) for p in s.MIXED])


def synthesize(parts, rng: random.Random, tmp: Path) -> np.ndarray:
    """Speak [(voice, text), ...] with one random speed and pitch: 16 kHz mono float32, short pauses between."""
    speed, pitch = rng.randint(135, 175), rng.randint(35, 65)
    pieces = []
    for i, (voice, text) in enumerate(parts):
        raw, res = tmp / f"part{i}.wav", tmp / f"part{i}.16k.wav"
        _run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text])
        _run(["sox", "-R", "-V1", str(raw), "-r", str(SR), "-c", "1", "-b", "32", "-e", "floating-point", str(res)])
        pieces.append(sf.read(res, dtype="float32")[0])
        if i < len(parts) - 1:
            pieces.append(np.zeros(int(SR * rng.uniform(0.05, 0.25)), np.float32))
    return np.concatenate(pieces)


def encode(audio: np.ndarray, path: Path, fmt: str) -> None:
    """Write 16 kHz mono ``audio`` to ``path`` in format ``fmt`` (a key of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "wav16k":
        sf.write(path, audio, SR, subtype="PCM_16")
        return
    with tempfile.TemporaryDirectory(prefix="krasr-enc-") as tmp:
        src = Path(tmp) / "src.wav"
        sf.write(src, audio, SR, subtype="FLOAT")
        if fmt == "mp348":
            _run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), "-ar", "48000", "-b:a", "96k", str(path)])
            return
        how = {"flac44st": ["-r", "44100", "-c", "2", "-b", "16"], "ogg22": ["-r", "22050"],
               "wav8k": ["-r", "8000", "-b", "16"]}[fmt]
        _run(["sox", "-R", "-V1", str(src), *how, str(path)])


def write_float_wav(path: Path, audio: np.ndarray) -> None:
    """32-bit float wav whose bytes depend on the samples only: libsndfile stamps its PEAK chunk with the time."""
    sf.write(path, audio, SR, subtype="FLOAT")
    data = bytearray(path.read_bytes())
    peak = data.find(b"PEAK", 12, 512)  # chunk id, size, version, then a 4-byte timestamp
    if peak >= 0:
        data[peak + 12:peak + 16] = bytes(4)
        path.write_bytes(bytes(data))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_clips(out: Path, rng: random.Random) -> list[Utterance]:
    """Every sentence as one clip under ``clips/`` and a row of ``clips.jsonl``."""
    formats, rows, utterances = list(FORMATS), [], []
    with tempfile.TemporaryDirectory(prefix="krasr-tts-") as tmp:
        for i, (category, parts) in enumerate(sentences()):
            u = Utterance(category, parts, synthesize(parts, rng, Path(tmp)))
            fmt = formats[i % len(formats)]
            rel = f"clips/{category}_{i:03d}{FORMATS[fmt]}"
            encode(u.audio, out / rel, fmt)
            utterances.append(u)
            rows.append({"id": f"{category}_{i:03d}", "path": rel, "language": LANGUAGE[category],
                         "category": category, "text": u.text})
    _jsonl(out / "clips.jsonl", rows)
    return utterances


def make_long(out: Path, k: int, utterances: list[Utterance], rng: random.Random, minutes: float,
              seed: int) -> tuple[dict, list[dict]]:
    """Long recording ``k``: its ``long.jsonl`` row and its ``spans.jsonl`` rows."""
    rid = f"long_{k:02d}"
    lead = np.zeros(int(SR * rng.uniform(0.5, 3.0)), np.float32)
    pieces, spans, t = [lead], [], len(lead) / SR
    categories = set()
    while t < minutes * 60:
        u = rng.choice(utterances)
        categories.add(u.category)
        spans.append({"id": rid, "start_s": round(t, 3), "end_s": round(t + u.duration_s, 3), "text": u.text})
        pieces.append(u.audio)
        t += u.duration_s
        pause = rng.choice(PAUSES_S)
        pieces.append(np.zeros(int(SR * pause), np.float32))
        t += pause
    audio = np.concatenate(pieces)
    audio = audio + np.random.default_rng(seed * 1000 + k).normal(0, 0.003, len(audio)).astype(np.float32)
    fmt = LONG_FORMATS[k % len(LONG_FORMATS)]
    rel = f"long/{rid}{FORMATS[fmt]}"
    encode(audio, out / rel, fmt)
    category = "mixed" if len(categories) > 1 else categories.pop()
    row = {"id": rid, "path": rel, "language": LANGUAGE[category], "category": category,
           "text": " ".join(s["text"] for s in spans), "duration_s": round(len(audio) / SR, 3)}
    return row, spans


def make_bad(out: Path, utterances: list[Utterance], rng: random.Random) -> None:
    """Inputs a run must survive, under ``bad/``, and ``bad.jsonl`` with what each should give."""
    bad = out / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    rows = []

    def row(name: str, expect: str, note: str) -> None:
        rows.append({"id": name, "path": f"bad/{name}", "expect": expect, "note": note})

    (bad / "empty.wav").write_bytes(b"")
    row("empty.wav", "error", "zero-byte file")
    first_wav = sorted(p for p in (out / "clips").iterdir() if p.suffix == ".wav")[0]
    (bad / "truncated.wav").write_bytes(first_wav.read_bytes()[:300])
    row("truncated.wav", "error", "wav cut inside its first frames")
    (bad / "noise_bytes.wav").write_bytes(bytes(rng.getrandbits(8) for _ in range(50000)))
    row("noise_bytes.wav", "error", "random bytes named .wav")
    (bad / "text.mp3").write_text("this is not audio\n")
    row("text.mp3", "error", "a text file named .mp3")
    sf.write(bad / "silence_60s.wav", np.zeros(SR * 60, np.float32), SR)
    row("silence_60s.wav", "ok-empty", "one minute of digital silence: no speech, no text")
    sf.write(bad / "tiny_0.1s.wav", utterances[0].audio[: SR // 10], SR)
    row("tiny_0.1s.wav", "ok", "a tenth of a second")
    nan = utterances[1].audio.copy()
    nan[1000:1100] = np.nan
    write_float_wav(bad / "nan_samples.wav", nan)
    row("nan_samples.wav", "ok-or-error", "float wav holding NaN samples")
    sf.write(bad / "six_channels.wav", np.stack([utterances[2].audio] * 6, axis=1), SR)
    row("six_channels.wav", "ok", "5.1 layout, same speech in every channel")
    silence = np.zeros(SR * 40, np.float32)
    sf.write(bad / "speech_in_silence.flac", np.concatenate([silence, utterances[3].audio, silence]), SR)
    row("speech_in_silence.flac", "ok", "one sentence between 40 s silences")
    (bad / "a dir.wav").mkdir(exist_ok=True)
    row("a dir.wav", "error", "a directory, not a file")
    rows.append({"id": "missing", "path": "bad/does_not_exist.wav", "expect": "error", "note": "no such file"})
    sf.write(bad / "имя с пробелом.wav", utterances[4].audio, SR)
    row("имя с пробелом.wav", "ok", "unicode and spaces in the name")
    _jsonl(out / "bad.jsonl", rows)


def build_corpus(out: str | Path, long: int = 2, long_minutes: float = 3.0, seed: int = 0,
                 bad: bool = True) -> Path:
    """Write the whole corpus into ``out`` (created; expected empty) and ``BUILT`` last; returns ``out``."""
    check_tools()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    utterances = make_clips(out, rng)
    longs, spans = [], []
    for k in range(long):
        row, rows = make_long(out, k, utterances, rng, long_minutes, seed)
        longs.append(row)
        spans.extend(rows)
    _jsonl(out / "long.jsonl", longs)
    _jsonl(out / "spans.jsonl", spans)
    if bad:
        make_bad(out, utterances, rng)
    stamp = {"seed": seed, "long": long, "long_minutes": long_minutes, "bad": bad}
    (out / "BUILT").write_text(json.dumps(stamp) + "\n")
    return out
