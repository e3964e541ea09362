"""The peers krasr-batch is measured against, each on the same audio, weights and decoding settings.

card_usage: the KRASR model card's usage: the transformers ASR pipeline called one file at a time with
task=transcribe, the forced language, num_beams=3, no_repeat_ngram_size=4, repetition_penalty=1.12 and
the duration-based max_new_tokens; chunk_length_s=30 for files over 30 s (the pipeline's own workaround).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from krasr_batch.decode import max_new_tokens_for


@dataclass
class Transcript:
    file_id: str
    text: str
    duration_s: float


def audio_duration_s(path: str) -> float:
    """Duration from the file header (soundfile, else PyAV), as a user of the card would get it."""
    import soundfile as sf

    try:
        info = sf.info(path)
        return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - formats libsndfile cannot read
        import av

        with av.open(path) as c:
            return c.duration / 1e6


def card_pipeline(model: str, device: str = "cpu"):
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
        dur = audio_duration_s(it["path"])
        kwargs = dict(generate_kwargs=dict(task="transcribe", language=it.get("language") or default_language,
                                           num_beams=beams, no_repeat_ngram_size=4, repetition_penalty=1.12,
                                           max_new_tokens=max_new_tokens_for(dur)))
        if dur > 30.0:
            kwargs.update(chunk_length_s=30, batch_size=1)
        r = asr(it["path"], **kwargs)
        out.append(Transcript(it["id"], r["text"].strip(), dur))
    return out, time.perf_counter() - t0
