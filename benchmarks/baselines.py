"""The peers krasr-batch is measured against, each on the same audio, weights and decoding settings.

card_usage: the KRASR model card's usage: the transformers ASR pipeline called one file at a time with
task=transcribe, the forced language, num_beams=3, no_repeat_ngram_size=4, repetition_penalty=1.12 and
the duration-based max_new_tokens; chunk_length_s=30 for files over 30 s (the pipeline's own workaround).

chunked_pipeline: the insanely-fast-whisper recipe: one pipeline call over the list of files with
chunk_length_s=30 and batch_size=16 (chunks of many files batched together), the card's generate settings
and max_new_tokens=128; one call per language, since a call takes one set of generate_kwargs.

faster_whisper_usage: faster-whisper's BatchedInferencePipeline (Silero VAD chunks of at most 30 s, batched)
on the same weights converted to CTranslate2 (krasr_batch.engines.ctranslate2.converted_model), with the card's decoding settings.

Each peer also runs as a whole command, which is how benchmarks.compare times it:

    python -m benchmarks.baselines {card,chunked,faster-whisper} MANIFEST --model DIR [--device cpu|cuda]
        [--result OUT.json]

MANIFEST is JSON Lines ({id, path, language?}); for faster-whisper, --model is the CTranslate2 folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from krasr_batch.engines.base import TOKEN_LIMIT_LONGEST, max_new_tokens_for
from krasr_batch.engines.ctranslate2 import ct2_max_length

log = logging.getLogger(__name__)

CARD_DECODING = dict(num_beams=3, no_repeat_ngram_size=4, repetition_penalty=1.12)
CHUNK_LENGTH_S = 30
PEER_BATCH_SIZE = 16


@dataclass
class Transcript:
    file_id: str
    text: str
    duration_s: float
    path_rate: int = 0  # the file's own sample rate


def audio_info(path: str) -> tuple[float, int]:
    """(duration in seconds, sample rate) from the file header (soundfile, else PyAV), as a card user gets it."""
    import soundfile as sf

    try:
        info = sf.info(path)
        return info.frames / info.samplerate, info.samplerate
    except Exception:  # noqa: BLE001 - formats libsndfile cannot read
        import av

        with av.open(path) as c:
            return c.duration / 1e6, c.streams.audio[0].rate


def audio_duration_s(path: str) -> float:
    """Duration in seconds from the file header."""
    return audio_info(path)[0]


def card_pipeline(model: str, device: str = "cpu"):
    """The card's transformers ASR pipeline: fp16 on CUDA, fp32 on the CPU."""
    import torch
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=model, device=device,
                    dtype=torch.float16 if device == "cuda" else torch.float32)


def card_usage(items: list[dict], model: str, device: str = "cpu", beams: int = 3,
               default_language: str = "kazakh", asr=None) -> tuple[list[Transcript], float]:
    """Transcribe ``items`` ({id, path, language?}) the card's way; returns (transcripts, wall seconds incl. load)."""
    t0 = time.perf_counter()
    asr = asr or card_pipeline(model, device)
    out = []
    for it in items:
        dur, rate = audio_info(it["path"])
        kwargs = dict(generate_kwargs=card_generate_kwargs(it.get("language") or default_language,
                                                           max_new_tokens_for(dur), beams))
        if dur > CHUNK_LENGTH_S:
            kwargs.update(chunk_length_s=CHUNK_LENGTH_S, batch_size=1)
        r = asr(it["path"], **kwargs)
        out.append(Transcript(it["id"], r["text"].strip(), dur, rate))
    return out, time.perf_counter() - t0


def card_generate_kwargs(language: str, max_new_tokens: int, beams: int = 3) -> dict:
    """The card's generate() settings for one language and token limit."""
    return dict(task="transcribe", language=language, **dict(CARD_DECODING, num_beams=beams),
                max_new_tokens=max_new_tokens)


def chunked_pipeline(items: list[dict], model: str, device: str = "cpu", beams: int = 3,
                     default_language: str = "kazakh", batch_size: int = PEER_BATCH_SIZE,
                     asr=None) -> tuple[list[Transcript], float]:
    """Transcribe ``items`` the insanely-fast-whisper way; returns (transcripts in input order, wall s incl. load).

    One pipeline call per language over that language's files, chunk_length_s=30, ``batch_size`` chunks a
    model call, the card's generate settings with max_new_tokens=128 (the card's limit for a full window).
    """
    t0 = time.perf_counter()
    asr = asr or card_pipeline(model, device)
    by_language: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_language[it.get("language") or default_language].append(i)
    texts: dict[int, str] = {}
    for language, idx in by_language.items():
        results = asr([items[i]["path"] for i in idx], chunk_length_s=CHUNK_LENGTH_S, batch_size=batch_size,
                      generate_kwargs=card_generate_kwargs(language, TOKEN_LIMIT_LONGEST, beams))
        texts.update({i: r["text"].strip() for i, r in zip(idx, results)})
    out = []
    for i, it in enumerate(items):
        dur, rate = audio_info(it["path"])
        out.append(Transcript(it["id"], texts[i], dur, rate))
    return out, time.perf_counter() - t0


def ct2_quantization(device: str) -> str:
    """The CTranslate2 weight type the comparison uses: float16 on a GPU (as krasr-batch), float32 on a CPU."""
    return "float16" if device == "cuda" else "float32"


def whisper_language(item: dict, default_language: str = "kazakh") -> str:
    """The Whisper code ('kk', 'ru') to force for a manifest item: its ``whisper_language``, else from ``language``.

    benchmarks.compare writes ``whisper_language`` into the manifest, so the faster-whisper command does not
    import transformers (about a second) just to map names to codes.
    """
    if item.get("whisper_language"):
        return item["whisper_language"]
    from krasr_batch.engines import language_code

    return language_code(item.get("language") or default_language)


def cpu_threads() -> int:
    """CTranslate2's CPU threads: OMP_NUM_THREADS when set, else every core (as torch uses them)."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)


FW_PROMPT_LEN = 4  # faster-whisper's prompt here: <|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>


def faster_whisper_max_new_tokens(limit: int) -> int:
    """The ``max_new_tokens`` that lets faster-whisper decode ``limit`` tokens (the card's limit).

    faster-whisper hands CTranslate2 ``max_length = len(prompt) + max_new_tokens``, and CTranslate2's Whisper
    decodes at most ``max_length // 2`` steps after the prompt (``krasr_batch.engines.ctranslate2.ct2_max_length``):
    given the card's 40 for a short clip it stops after 22 tokens, and after 66 of a 30 s window's 128. So it
    gets the ``max_length`` krasr-batch's CTranslate2 engine passes for the same limit, less the prompt."""
    return ct2_max_length(limit, FW_PROMPT_LEN) - FW_PROMPT_LEN


def faster_whisper_usage(items: list[dict], ct2_model: str, device: str = "cpu", beams: int = 3,
                         default_language: str = "kazakh",
                         batch_size: int = PEER_BATCH_SIZE) -> tuple[list[Transcript], float]:
    """Transcribe ``items`` with faster-whisper's BatchedInferencePipeline; returns (transcripts, wall s incl. load).

    The card's decoding settings (beam 3, no_repeat_ngram_size=4, repetition_penalty=1.12, the language
    forced per file, task transcribe, no timestamps, no conditioning on previous text) and the card's token
    limit for the file's duration (128 past 30 s), made effective (:func:`faster_whisper_max_new_tokens`); VAD
    chunking as the batched pipeline's default.
    """
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    t0 = time.perf_counter()
    model = WhisperModel(ct2_model, device=device, compute_type=ct2_quantization(device), cpu_threads=cpu_threads())
    pipe = BatchedInferencePipeline(model)
    out = []
    for it in items:
        dur, rate = audio_info(it["path"])
        segments, _ = pipe.transcribe(
            it["path"], language=whisper_language(it, default_language), task="transcribe",
            beam_size=beams, no_repeat_ngram_size=CARD_DECODING["no_repeat_ngram_size"],
            repetition_penalty=CARD_DECODING["repetition_penalty"], without_timestamps=True,
            condition_on_previous_text=False, max_new_tokens=faster_whisper_max_new_tokens(max_new_tokens_for(dur)),
            batch_size=batch_size)
        out.append(Transcript(it["id"], " ".join(s.text.strip() for s in segments).strip(), dur, rate))
    return out, time.perf_counter() - t0


PEERS = {"card": card_usage, "chunked": chunked_pipeline, "faster-whisper": faster_whisper_usage}


def read_manifest(path: str) -> list[dict]:
    """Manifest lines as dicts; relative paths made absolute against the manifest's folder."""
    base = Path(path).resolve().parent
    items = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    for it in items:
        it.setdefault("id", it["path"])
        if not os.path.isabs(it["path"]):
            it["path"] = str(base / it["path"])
    return items


def main(argv: list[str] | None = None) -> None:
    """Run one peer over a manifest as a whole command; print (or write) its texts and in-process wall."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.baselines", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("system", choices=sorted(PEERS))
    ap.add_argument("manifest")
    ap.add_argument("--model", required=True, help="transformers folder (CTranslate2 folder for faster-whisper)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--result", help="write {texts, wall_s} here as JSON instead of stdout")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fn = PEERS[a.system]
    transcripts, wall_s = fn(read_manifest(a.manifest), a.model, device=a.device)
    result = {"system": a.system, "wall_s": wall_s, "texts": {t.file_id: t.text for t in transcripts}}
    text = json.dumps(result, ensure_ascii=False)
    if a.result:
        Path(a.result).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
