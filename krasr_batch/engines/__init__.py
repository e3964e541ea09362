"""Model engines: one file each, behind one interface (:class:`~krasr_batch.engines.base.Decoder`).

- ``base.py``: segment records, token limits, language codes, errors and defaults shared by every engine;
- ``transformers.py``: ``WhisperForConditionalGeneration.generate()``, the card's own call;
- ``ctranslate2.py``: the same weights converted once to CTranslate2, decoded in C++;
- ``torch_beam.py``: Whisper and a batched beam search in plain torch, for GPUs and CPUs with bfloat16 units.

This module is the only place that imports an engine, lazily, so that choosing one never loads another.
A new engine is one new file and one line in :data:`ENGINE_CLASSES`.
"""

from __future__ import annotations

import importlib
import importlib.util

from krasr_batch.engines.base import (
    FIT_TOKENS_PER_S,
    MODEL_MAX_NEW_TOKENS,
    Decoder,
    SegmentInput,
    SegmentOutput,
    language_code,
    local_model_dir,
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
    "torch": ("krasr_batch.engines.torch_beam", "TorchBeamDecoder"),
}

__all__ = [
    "Decoder", "SegmentInput", "SegmentOutput", "FIT_TOKENS_PER_S", "MODEL_MAX_NEW_TOKENS", "check_model",
    "choose_engine", "language_code", "load_decoder", "max_new_tokens_for", "resolve_device", "segment_token_limit",
]


def choose_engine(use_gpu: bool, dtype: str = "auto") -> tuple[str, str]:
    """What ``--engine auto`` runs: ``(engine, why)`` for a run whose replicas are GPUs (``use_gpu``) or CPUs.

    The rule (README, "Engines"): the fastest engine whose WER and CER on the benchmark corpus are within
    0.005 of the transformers engine's (the card's own call), per device, as measured in BENCHMARKS.md:

    - CPUs that multiply bfloat16 natively (AMX or AVX512-BF16, read from this machine's /proc/cpuinfo): torch
      (engines/torch_beam.py), 1.4 to 1.9 times CTranslate2's speed there with the same error rates (issue
      12's "Fifth round"); with ``--word-timestamps`` too (1.57x CTranslate2's speed with them, the same
      boundary errors: block ``words-cost``). It has no int8: with a ``--dtype`` other than auto and
      bfloat16, ctranslate2 (as measured before it). A node of a cluster whose CPU lacks
      those units runs the torch engine in float32, at about CTranslate2's speed.
    - Other CPUs: ctranslate2. Same weights and settings, and on the archive set several times the
      transformers engine's speed with WER/CER no worse (block ``archive-cpu``).
    - GPUs: torch, in float16. On an H100 its model stage ran at 740x real time where transformers' generate()
      reached at most 68x, compiled or not (BENCHMARKS.md, block ``gpu-check``): generate()'s beam search
      copies every beam's cross-attention keys and values and spends its steps in Python. With
      ``--word-timestamps`` too (their pass is one teacher-forced decoder pass after the search, as in the
      transformers engine). With ``--dtype int8``: transformers. CTranslate2's CUDA build could not run on the
      GPU machine there (it wants CUDA 12 libraries), so it has no figure.
    - ctranslate2 not importable (it is a dependency, but a trimmed environment may lack it): transformers.
    """
    if use_gpu:
        if dtype == "int8":
            return "transformers", "GPU replicas in int8: the transformers engine (the torch engine has no int8)"
        return "torch", "GPU replicas: the torch engine's batched beam search is the fastest measured on a GPU"
    from krasr_batch.engines.encoder import cpu_has_bf16_matmul

    if cpu_has_bf16_matmul() and dtype in ("auto", "bfloat16"):
        return "torch", ("CPU replicas with bfloat16 units: the torch engine's batched beam search is the fastest "
                         "there at the card's accuracy")
    if importlib.util.find_spec("ctranslate2") is None:
        return "transformers", "CPU replicas, but the ctranslate2 package is not installed"
    return "ctranslate2", "CPU replicas: CTranslate2 is the fastest engine there at the card's accuracy"


def engine_class(name: str) -> type[Decoder]:
    module, cls = ENGINE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def check_model(options: DecodeOptions) -> frozenset[str]:
    """Fail fast, in the driver, with one clear RuntimeError when ``options.model`` cannot be used: its
    tokenizer, feature extractor and generation config load, a local folder holds safetensors weights, it
    has a token for ``--language`` and ``--languages``, and the CTranslate2 engine has its converted copy
    (converted here once, so replicas find it cached). Returns the Whisper codes of the model's languages."""
    # a hub id: its snapshot, downloaded here once for every replica on this machine. Where the hub cannot be
    # reached this fails at once (or finds the cached snapshot); transformers' own loading retried each file
    # for about 20 s, and the run said nothing for minutes before its error
    folder = local_model_dir(options.model)
    require_safetensors(folder, options.model)
    numpy = options.engine in ("ctranslate2", "torch")
    # read as those engines' replicas read it: from the folder, without importing transformers (over a second of CPU
    # on the driver while the embedded Ray starts)
    decoder = Decoder(options, "cpu")
    decoder._load_processor(numpy_features=numpy, folder=folder)
    if options.engine == "ctranslate2":
        from krasr_batch.engines.ctranslate2 import converted_model

        converted_model(str(folder))
    return frozenset(decoder.token_by_code)


def load_decoder(options: DecodeOptions, device: str = "auto", threads: int | None = None) -> Decoder:
    """One model replica of ``options.engine``; ``threads``: CPU threads it may use (None: the engine's default).

    ``--engine auto`` is resolved here by the replica's own device when the caller has not resolved it."""
    if options.engine == "auto":
        import dataclasses

        engine = choose_engine(resolve_device(device) == "cuda", options.dtype)[0]
        options = dataclasses.replace(options, engine=engine)
    cls = engine_class(options.engine)
    if options.engine in ("ctranslate2", "torch"):
        return cls(options, device, threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return cls(options, device)
