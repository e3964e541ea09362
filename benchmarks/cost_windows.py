"""What the model-cost benchmarks share (``encoder_cost``, ``beam_cost``, ``ct2_step_cost``, ``encoder_agreement``):
their command line's common part, their input, consecutive 30 s windows of a long recording from its 60th second
on, and the encoder's attention as it was before stop 44."""

from __future__ import annotations

import argparse
import contextlib

import numpy as np

FIRST_S = 60  # skip a recording's opening (often silence or a jingle in real archives)
WINDOW_S = 30


def cost_parser(doc: str) -> argparse.ArgumentParser:
    """MODEL (a local folder), AUDIO (a long recording) and ``--threads`` (default 1), described by ``doc``'s
    first paragraph."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("audio")
    ap.add_argument("--threads", type=int, default=1)
    return ap


def long_windows(model: str, audio_path: str, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` consecutive 30 s windows of ``audio_path`` from its 60th second, and their log-mel features
    (float32, C-contiguous: what CTranslate2's ``StorageView`` and the torch encoder both take)."""
    from krasr_batch.audio import SAMPLE_RATE as sr
    from krasr_batch.audio import load_audio
    from krasr_batch.engines.base import NumpyLogMel

    audio = load_audio(audio_path)
    windows = [audio[(FIRST_S + WINDOW_S * i) * sr:(FIRST_S + WINDOW_S * (i + 1)) * sr] for i in range(n)]
    if len(windows[-1]) < WINDOW_S * sr:
        raise SystemExit(f"{audio_path} is {len(audio) / sr:.0f} s long: {n} windows need "
                         f"{FIRST_S + WINDOW_S * n} s")
    feats = NumpyLogMel.from_pretrained(model)(windows)["input_features"]
    return windows, np.ascontiguousarray(feats, dtype=np.float32)


@contextlib.contextmanager
def flash_kernel_in_encoder():
    """Within it, krasr-batch's torch encoder runs PyTorch's flash-attention kernel everywhere (what it ran
    before stop 44), instead of ``engines.encoder.attention``'s two products on CPUs in bfloat16."""
    from krasr_batch.engines import encoder

    ours = encoder.attention
    encoder.attention = encoder.sdpa_attention
    try:
        yield
    finally:
        encoder.attention = ours
