"""The CTranslate2 engine (``--engine ctranslate2``): the same Whisper weights, converted once, decoded by
CTranslate2 with the card's settings.

Why: on a CPU, transformers' ``generate()`` spends most of a segment's time outside the model's matrices
(beam bookkeeping, logits processors, cache copies; see BENCHMARKS.md). CTranslate2 runs the same beam
search in C++ (the runtime behind faster-whisper and WhisperX).

What stays the card's: the weights (converted from the model folder's safetensors, float32 as stored), the
log-mel features (the model's own WhisperFeatureExtractor), the prompt (<|startoftranscript|> <|lang|>
<|transcribe|> <|notimestamps|>), beams, no_repeat_ngram_size, repetition_penalty, the suppressed tokens of
the model's generation config, and the duration-based token limit, exactly.

What differs, so the text can differ on uncertain audio: CTranslate2 applies the repetition penalty to the
logits (transformers applies it to the log-probabilities), and its beam search stops once ``beams``
hypotheses have ended (transformers keeps going while a running beam could still win). With ``--dtype auto``
on a CPU that multiplies bfloat16 natively (AMX, AVX512-BF16) the encoder runs in torch bfloat16
(engines/encoder.py), 3.1 times faster than CTranslate2's own int8 encoder there, and the decoder runs with
float32 weights; on other CPUs both run with int8 weights.

The converted model is cached per node under ``$KRASR_BATCH_CACHE/ct2`` (default ``~/.cache/krasr-batch``),
keyed by the checkpoint's files and the ctranslate2 version; concurrent replicas take a file lock, so one
converts and the others wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from krasr_batch.audio import SAMPLE_RATE
from krasr_batch.engines.base import (
    MODEL_MAX_NEW_TOKENS,
    Decoder,
    SegmentOutput,
    default_batch_size,
    default_dtype_name,
    feature_extractor_config,
    language_code,
    local_model_dir,
    require_safetensors,
)
from krasr_batch.engines.timing import MEDIAN_FILTER_WIDTH, Word, num_frames, words_from_alignment
from krasr_batch.settings import DecodeOptions
from krasr_batch.storage import file_lock

log = logging.getLogger(__name__)

CACHE_ENV = "KRASR_BATCH_CACHE"
INSTALL_HINT = "pip install ctranslate2 (a dependency of krasr-batch; this environment lacks it)"
# files the converted folder carries besides model.bin, so that it also loads in faster-whisper
_COPIED = ("tokenizer.json", "preprocessor_config.json")


def import_ctranslate2():
    try:
        import ctranslate2
    except ImportError as e:
        raise RuntimeError(f"--engine ctranslate2 needs the ctranslate2 package: {INSTALL_HINT}") from e
    return ctranslate2


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "krasr-batch")


def _cache_key(src: Path, quantization: str | None) -> str:
    """A folder name that changes with the checkpoint's files, the ctranslate2 version and the quantization."""
    ct2 = import_ctranslate2()
    h = hashlib.sha256(f"{src.resolve()}|{ct2.__version__}|{quantization}".encode())
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors") or f.name == "vocab.txt"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{src.name or 'model'}-{h.hexdigest()[:12]}" + (f"-{quantization}" if quantization else "")


def converted_model(model: str, cache_dir: str | Path | None = None, quantization: str | None = None) -> Path:
    """The CTranslate2 folder of ``model`` (a transformers Whisper folder or hub id), converted on first use.

    Safetensors weights only, no remote code. ``quantization`` None keeps the stored weight type (the compute
    type is chosen at load time); the folder also holds tokenizer.json and preprocessor_config.json.
    """
    ct2 = import_ctranslate2()
    src = local_model_dir(model)
    require_safetensors(src, model)
    root = Path(cache_dir) if cache_dir else cache_root() / "ct2"
    dest = root / _cache_key(src, quantization)
    if (dest / "model.bin").exists():
        return dest
    with file_lock(root / f".{dest.name}.lock"):
        if (dest / "model.bin").exists():  # another replica converted it while this one waited
            return dest
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
        try:
            converter = _safetensors_converter(ct2, str(src), [f for f in _COPIED if (src / f).exists()])
            converter.convert(str(tmp / "out"), quantization=quantization, force=True)
            fe = feature_extractor_config(src)
            if fe is not None and not (tmp / "out" / "preprocessor_config.json").exists():
                (tmp / "out" / "preprocessor_config.json").write_text(json.dumps(fe, indent=1))
            (tmp / "out").rename(dest)
        except Exception as e:
            raise RuntimeError(f"cannot convert {src} to CTranslate2: {type(e).__name__}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s to CTranslate2 in %.1f s: %s", src, time.perf_counter() - t0, dest)
    return dest


def _safetensors_converter(ct2, path: str, copy_files: list[str]):
    """ctranslate2's TransformersConverter, told to read safetensors only and never run remote code."""

    class Converter(ct2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            kwargs.pop("trust_remote_code", None)
            return model_class.from_pretrained(model_name_or_path, use_safetensors=True, trust_remote_code=False,
                                               **kwargs)

    return Converter(path, copy_files=copy_files or None, trust_remote_code=False)


def compute_type_for(dtype: str, device: str) -> str:
    """CTranslate2's compute type for ``--dtype``.

    auto: float16 on CUDA, as in the transformers engine. On a CPU whose encoder runs in torch bfloat16
    (:func:`cpu_bf16_encoder`) the decoder runs with float32 weights: with the encoder's time cut to a
    third, float32 decoding costs 25 % of the run's wall and buys WER/CER 96.0 / 45.8 % against int8's
    96.6 / 46.5 % on the archive set (BENCHMARKS.md, block ``archive-all``). On other CPUs, int8 weights, where
    beam search is bound by reading the weights each step and int8 decoded 1.24x faster than float32 with
    error rates within 0.005 (block ``archive-clips-float32``). int8 is int8 weights with float16 (CUDA) or
    float32 (CPU) activations; float32 keeps the stored weights.
    """
    if dtype == "auto" and device == "cpu":
        return "float32" if cpu_bf16_encoder(dtype, device) else "int8"
    if dtype == "int8" or (dtype == "auto" and device != "cuda"):
        return "int8_float16" if device == "cuda" else "int8"
    return default_dtype_name(dtype, device)


def cpu_bf16_encoder(dtype: str, device: str) -> bool:
    """Whether a CTranslate2 replica runs Whisper's encoder in torch bfloat16 (engines/encoder.py): with
    ``--dtype auto`` on a CPU that multiplies bfloat16 natively (AMX or AVX512-BF16), where it ran the encoder
    3.1 times faster than CTranslate2's int8 encoder (BENCHMARKS.md, issue 12's "Fourth round"). ``--dtype
    int8`` or ``float32`` keep CTranslate2's own encoder."""
    if dtype != "auto" or device != "cpu":
        return False
    from krasr_batch.engines.encoder import cpu_has_bf16_matmul

    return cpu_has_bf16_matmul()


def ct2_max_length(max_new_tokens: int, prompt_len: int) -> int:
    """The ``max_length`` that makes CTranslate2's Whisper decode at most ``max_new_tokens`` steps.

    CTranslate2 decodes ``min(max_length // 2, max_length - (prompt_len - 1))`` steps after the prompt
    (src/models/whisper.cc); the end-of-text token counts as a step, as in transformers' max_new_tokens.
    """
    return max(2 * max_new_tokens, max_new_tokens + prompt_len - 1)


def _beyond_room(text_idx: np.ndarray, time_idx: np.ndarray, probs: list[float], n: int):
    """A DTW path over the first ``room`` text tokens and end-of-text, made a path over all ``n`` text tokens
    and end-of-text: its end-of-text row is the one that predicts the next token (the decoder's rows do not
    depend on what they predict), and the rows after it (the last tokens' and end-of-text's, for which the
    model has no positions) sit at the path's last frame, so the last word ends where the path does. Each
    token past the room takes the last known token's probability."""
    extra = np.arange(text_idx[-1] + 1, n + 1)
    text_idx = np.concatenate([text_idx, extra])
    time_idx = np.concatenate([time_idx, np.full(len(extra), time_idx[-1])])
    probs = probs + [probs[-1] if probs else 0.0] * (n - len(probs))
    return text_idx, time_idx, probs


class CTranslate2Decoder(Decoder):
    """One CTranslate2 model replica; ``decode(inputs)`` as the transformers engine's."""

    engine = "ctranslate2"

    def __init__(self, options: DecodeOptions, device: str = "auto", threads: int | None = None):
        ct2 = import_ctranslate2()
        if device == "auto":
            device = "cuda" if ct2.get_cuda_device_count() > 0 else "cpu"
        elif device == "cuda" and ct2.get_cuda_device_count() == 0:
            raise RuntimeError("--device cuda was asked for, but CTranslate2 sees no CUDA device")
        super().__init__(options, device)
        t0 = time.perf_counter()
        # no torch and no transformers in a CTranslate2 replica
        folder = local_model_dir(options.model)  # a hub id asks the hub once, not once for each use below
        self._load_processor(numpy_features=True, folder=folder)
        path = converted_model(str(folder))
        self.compute_type = weights = compute_type_for(options.dtype, device)
        try:
            self.model = ct2.models.Whisper(str(path), device=device, compute_type=self.compute_type,
                                            intra_threads=threads or 0, inter_threads=1)
        except (RuntimeError, ValueError) as e:
            raise RuntimeError(f"CTranslate2 cannot load {path} on {device} as {self.compute_type}: {e}") from e
        self._init_prompt()
        self.token_by_code = {code: tid for tid, code in self.lang_by_token.items()}
        self.batch_size = default_batch_size(options.batch_size, device, self.engine)
        # the encoder in torch bfloat16 where the CPU multiplies bfloat16 natively (engines/encoder.py)
        self.torch_encoder = None
        if cpu_bf16_encoder(options.dtype, device):
            from krasr_batch.engines.encoder import TorchEncoder

            self.torch_encoder = TorchEncoder(folder, "bfloat16", threads)
            self.compute_type += ", encoder bfloat16 (torch)"
        self.precision = weights + ("+encoder-bfloat16" if self.torch_encoder else "")
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s with CTranslate2 on %s (%s) in %.1f s", path, device, self.compute_type, self.load_s)

    # one prompt per row: languages share a batch; windows' token budgets share one too (cut per row)
    mixed_languages = True
    flexible_limits = True

    continues_cut_clips = True

    def _generate_batch(self, batch: list) -> list[SegmentOutput]:
        return self._generate([x.audio for x in batch], [x.language for x in batch],
                              [x.max_new_tokens for x in batch], batch)

    def _generate(self, audios: list[np.ndarray], language, limit, inputs: list | None = None) -> list[SegmentOutput]:
        """Decode one batch. ``language`` and ``limit``: one for every row, or a list with one per row (None:
        detect that row's language). The batch decodes up to its largest limit; a row that ran past its own
        is cut there and counts as truncated, as if it had been decoded with its own limit. ``inputs``: the
        rows' SegmentInputs, for continuing the clips their card limit cut short (Decoder.decode)."""
        import ctranslate2

        n_rows = len(audios)
        languages = list(language) if isinstance(language, list) else [language] * n_rows
        limits = list(limit) if isinstance(limit, list) else [limit] * n_rows
        t0 = time.perf_counter()
        feats = self._features(audios, "np")["input_features"]
        # the encoder once, for detection, generation and alignment; detection's first step also gives the
        # probability of a forced language
        if self.torch_encoder is not None:
            encoded = self.torch_encoder(feats)  # float32 numpy; the StorageView below does not copy it
            features = ctranslate2.StorageView.from_array(encoded)
        else:
            features = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats, dtype=np.float32))
            features = self.model.encode(features, to_cpu=False)
        scores = [self._language_scores(ranked) for ranked in self.model.detect_language(features)]
        # a forced language is decoded as asked; the others are detected among the candidates (--languages)
        codes = [language_code(x) if x is not None else self.detect_language(sc)[0] for x, sc in zip(languages, scores)]
        prompts = [self._prompt(c) for c in codes]
        results, rows = self._search(features, prompts, limits, no_speech=True)
        budgets = self._continue_cut(inputs, features, prompts, rows) if inputs is not None else {}
        o = self.options
        words = (self._align(features, codes, [t for t, *_ in rows], audios) if o.word_timestamps
                 else [None] * n_rows)
        decode_s = time.perf_counter() - t0
        out = []
        for i, (code, r, sc, w, (tokens, n, ended, score)) in enumerate(zip(codes, results, scores, words, rows)):
            # CTranslate2's score is the summed log-probability (end-of-text included) over the text tokens;
            # Whisper's avg_logprob averages over the text tokens and end-of-text
            avg = None if score is None else float(score * n / (n + 1) if ended and n else score)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            out.append(SegmentOutput(text, code, n, not ended, decode_s, n_rows, avg, float(r.no_speech_prob),
                                     self.language_prob(sc, code), w, budgets.get(i)))
        return out

    def _search(self, features, prompts: list[list[int]], limits: list[int], no_speech: bool = False,
                begin: bool = True):
        """CTranslate2's beam search with the card's settings: (its results, and each row's ``(tokens, n, ended,
        score)``). ``limits`` count the text tokens, the end-of-text step included; tokens after a prompt's
        first four are text that the search continues (CTranslate2 forces them, and returns them with what
        follows, its score then covering only what follows). The batch decodes to its largest limit; a row past
        its own is cut there, as a decode with that limit stops. ``score``: CTranslate2's, the summed
        log-probability over the text tokens divided by their number (None where a row was cut). ``begin``: the
        text starts here (the blank and end-of-text banned at the first step, as Whisper's begin-suppression
        does); False where the prompts end in text, which may end at once."""
        o = self.options
        top = max(limits)
        head = len(self.prompt_tail) + 2  # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>
        results = self.model.generate(
            features, prompts, beam_size=o.beams, no_repeat_ngram_size=o.no_repeat_ngram_size,
            repetition_penalty=o.repetition_penalty, max_length=ct2_max_length(top, head),
            return_scores=True, return_no_speech_prob=no_speech, suppress_blank=begin)
        rows = []
        for own, r in zip(limits, results):
            tokens = r.sequences_ids[0]
            n = len(tokens)
            ended = n < top  # the end-of-text step counts toward the limit, so a full-length row never ended
            score = r.scores[0] if r.scores else None
            if n >= own and own < top:  # past its own limit: cut there, as a decode with that limit stops
                tokens, n, ended = tokens[:own], own, False
                score = None  # the score covers tokens this row no longer has
            rows.append((tokens, n, ended, score))
        return results, rows

    def _continue_cut(self, inputs: list, features, prompts: list[list[int]], rows: list) -> dict[int, int]:
        """Continue, in place in ``rows``, the clips their card limit cut short with real text (Decoder.decode)
        to their "fit" budget, over the same encoder output: the cut tokens follow the prompt, so the text is
        the card's call and what follows it. Returns each continued row's budget."""
        budgets = self._going_on(inputs, [not ended for _, _, ended, _ in rows],
                                 lambda i: self.tokenizer.decode(rows[i][0], skip_special_tokens=True).strip())
        by_length: dict[int, list[int]] = defaultdict(list)  # one search's prompts are of one length
        for i in budgets:
            by_length[rows[i][1]].append(i)
        for n, idx in by_length.items():
            sub, keep = (features, None) if len(idx) == len(rows) else self._rows(features, idx)
            _, more = self._search(sub, [prompts[i] + rows[i][0] for i in idx], [budgets[i] for i in idx],
                                   begin=False)
            del keep
            for i, (tokens, m, ended, score) in zip(idx, more):
                first = rows[i][3]  # the cut text's summed log-probability is first * n; what follows, score * m
                rows[i] = (tokens, m, ended, None if first is None or score is None else (first * n + score * m) / m)
        if budgets:
            log.debug("continued %d clip(s) their card limit cut short to the fit budget", len(budgets))
        return budgets

    def _language_scores(self, ranked: list[tuple[str, float]]) -> np.ndarray:
        """detect_language's (token, probability) pairs as log-probabilities indexed by token id (-inf for
        every other token), the form :meth:`Decoder.detect_language` takes: restricting them to some languages
        and taking the softmax renormalises their probabilities."""
        out = np.full(max(self.lang_by_token) + 1, -np.inf)
        for token, p in ranked:
            tid = self.token_by_code.get(token[2:-2])
            if tid is not None:
                out[tid] = np.log(max(p, 1e-30))
        return out

    def _align(self, encoded, codes: list[str], tokens: list[list[int]], audios: list[np.ndarray]) -> list[tuple[Word, ...]]:
        """Each row's words (see engines/timing.py) from ``Whisper.align`` over the encoder output, one call
        per language in the batch (its start sequence holds the language token)."""
        gc = self.generation_config
        task = self.prompt_tail[0]
        out: list[tuple[Word, ...]] = [()] * len(tokens)
        by_code: dict[str, list[int]] = {}
        for i, (code, t) in enumerate(zip(codes, tokens)):
            if t:
                by_code.setdefault(code, []).append(i)
        # align() runs the 4-token prompt, the text and end-of-text through the decoder: a text that filled the
        # model's positions (MODEL_MAX_NEW_TOKENS, cut short) leaves no position for end-of-text (_beyond_room)
        room = MODEL_MAX_NEW_TOKENS - 1
        for code, idx in by_code.items():
            rows, keep = (encoded, None) if len(idx) == len(tokens) else self._rows(encoded, idx)
            aligned = self.model.align(rows, [gc.decoder_start_token_id, self.token_by_code[code], task],
                                       [tokens[i][:room] for i in idx], [num_frames(len(audios[i])) for i in idx],
                                       median_filter_width=MEDIAN_FILTER_WIDTH)
            del keep
            for i, a in zip(idx, aligned):
                path = np.asarray(a.alignments, dtype=np.int64).reshape(-1, 2)
                text_idx, time_idx, probs = path[:, 0], path[:, 1], list(a.text_token_probs)
                if len(tokens[i]) > room:
                    text_idx, time_idx, probs = _beyond_room(text_idx, time_idx, probs, len(tokens[i]))
                out[i] = tuple(words_from_alignment(tokens[i], text_idx, time_idx, probs, self._word_decode, self.eos,
                                                    code, len(audios[i]) / SAMPLE_RATE))
        return out

    def _rows(self, encoded, idx: list[int]):
        """The encoder output's rows ``idx`` as a new StorageView, and the array that holds its memory."""
        import ctranslate2

        if self.device == "cuda":
            import torch

            held = torch.as_tensor(encoded, device="cuda")[idx].contiguous()
        else:
            held = np.ascontiguousarray(np.asarray(encoded)[idx])
        return ctranslate2.StorageView.from_array(held), held
