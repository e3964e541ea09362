"""Model engines: one file each, behind one interface (:class:`~krasr_batch.engines.base.Decoder`).

- ``base.py``: segment records, token limits, language codes, errors and defaults shared by every engine;
- ``transformers.py``: ``WhisperForConditionalGeneration.generate()``, the card's own call;
- ``ctranslate2.py``: the same weights converted once to CTranslate2, decoded in C++.

This module is the only place that imports an engine, lazily, so that choosing one never loads another.
A new engine is one new file and one line in :data:`ENGINE_CLASSES`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from krasr_batch.engines.base import (
    FIT_TOKENS_PER_S,
    MODEL_MAX_NEW_TOKENS,
    Decoder,
    SegmentInput,
    SegmentOutput,
    language_code,
    max_new_tokens_for,
    require_safetensors,
    resolve_device,
    segment_token_limit,
)
from krasr_batch.settings import DecodeOptions

# --engine name -> (module, class)
ENGINE_CLASSES = {
    "transformers": ("krasr_batch.engines.transformers", "WhisperDecoder"),
    "ctranslate2": ("krasr_batch.engines.ctranslate2", "CTranslate2Decoder"),
}

__all__ = [
    "Decoder", "SegmentInput", "SegmentOutput", "FIT_TOKENS_PER_S", "MODEL_MAX_NEW_TOKENS", "check_model",
    "language_code", "load_decoder", "max_new_tokens_for", "resolve_device", "segment_token_limit",
]


def engine_class(name: str) -> type[Decoder]:
    module, cls = ENGINE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def check_model(options: DecodeOptions) -> None:
    """Fail fast, in the driver, with one clear RuntimeError when ``options.model`` cannot be used: its
    tokenizer, feature extractor and generation config load, a local folder holds safetensors weights, and
    the CTranslate2 engine has its converted copy (converted here once, so replicas find it cached)."""
    local = Path(options.model).expanduser()
    if local.is_dir():
        require_safetensors(local, options.model)
    Decoder(options, "cpu")._load_processor()
    if options.engine == "ctranslate2":
        from krasr_batch.engines.ctranslate2 import converted_model

        converted_model(options.model)


def load_decoder(options: DecodeOptions, device: str = "auto", threads: int | None = None) -> Decoder:
    """One model replica of ``options.engine``; ``threads``: CPU threads it may use (None: the engine's default)."""
    cls = engine_class(options.engine)
    if options.engine == "ctranslate2":
        return cls(options, device, threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return cls(options, device)
