"""Whisper decoding with the KRASR model card's settings: token limits, batching, model.generate.

The card's usage is the transformers ASR pipeline; this module makes the same model call on batches of
segments from many files: the same log-mel features (WhisperFeatureExtractor, 30 s windows), the same
generate() settings, and the card's duration-based ``max_new_tokens``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from krasr_batch.settings import TOKEN_LIMIT_POLICIES, DecodeOptions

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# (longest segment in seconds, max_new_tokens), from the model card; longer segments get 128.
TOKEN_LIMITS: tuple[tuple[float, int], ...] = ((5.0, 40), (10.0, 64), (15.0, 80), (20.0, 96), (25.0, 112))
TOKEN_LIMIT_LONGEST = 128
TOKEN_LIMIT_UNKNOWN = 96
MODEL_MAX_NEW_TOKENS = 444  # Whisper's 448 target positions less the 4-token prompt


# Token-limit policies (issue 17). "card": the card's table for every segment. "fit" (the default): the
# card's table for a file decoded whole, exactly as the card decodes a short clip; a window cut from a longer
# recording gets at least FIT_TOKENS_PER_S tokens for each of its seconds, because the card's table (8 tokens
# a second at 5 s, 4.3 at 30 s) cuts dense speech short. "none": the model's own limit.
# Measured with benchmarks/token_fit.py (BENCHMARKS.md, block token-fit): on dense long Kazakh, Russian and mixed
# recordings the reference transcript of a window needs at most 9.0 tokens a second (the end-of-text token
# included); single Kazakh sentences need 8.8 a second on average and 11.4 at most. 12 covers a window that
# holds nothing but the densest sentence; at 30 s it is 360 tokens, below the model's own 444.
FIT_TOKENS_PER_S = 12.0


def max_new_tokens_for(duration_s: float | None) -> int:
    """The card's token limit for a clip of ``duration_s`` seconds (96 when unknown)."""
    if duration_s is None or not np.isfinite(duration_s):
        return TOKEN_LIMIT_UNKNOWN
    for longest, limit in TOKEN_LIMITS:
        if duration_s <= longest:
            return limit
    return TOKEN_LIMIT_LONGEST


def segment_token_limit(duration_s: float, whole_file: bool, policy: str = "fit") -> int:
    """``max_new_tokens`` for one segment of ``duration_s`` seconds under a token-limit ``policy``.

    ``whole_file``: the segment is the whole file (a short clip decoded whole, as the card's usage does),
    which keeps the card's limit under "fit" so the output equals the card's call.
    """
    if policy == "none":
        return MODEL_MAX_NEW_TOKENS
    card = max_new_tokens_for(duration_s)
    if policy == "card" or whole_file:
        return card
    if policy != "fit":
        raise ValueError(f"token limit policy must be one of {', '.join(TOKEN_LIMIT_POLICIES)}, got {policy!r}")
    return min(MODEL_MAX_NEW_TOKENS, max(card, math.ceil(FIT_TOKENS_PER_S * duration_s)))


@dataclass(frozen=True)
class SegmentInput:
    """One segment to decode: 16 kHz mono float32 samples and the language to force (None: detect)."""

    audio: np.ndarray
    language: str | None
    max_new_tokens: int


@dataclass(frozen=True)
class SegmentOutput:
    text: str
    language: str
    num_tokens: int
    truncated: bool
    decode_s: float  # wall seconds of the model call (features, encoder, generate, rescoring) for the batch
    batch_size: int
    avg_logprob: float | None = None  # mean log-probability of the text tokens and end-of-text, as Whisper reports it
    no_speech_prob: float | None = None  # probability of <|nospeech|> right after <|startoftranscript|>


def model_error(model: str, cause: Exception) -> RuntimeError:
    reason = str(cause).strip().rstrip(".")
    return RuntimeError(f"cannot load the model {model!r}: {reason}. Give --model a local folder "
                        "(transformers format, safetensors) or a hub id reachable from here.")


def language_code(language: str | None) -> str:
    """Whisper's code for a language name or code ("kazakh" -> "kk"); "" when unknown."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    if not language:
        return ""
    lang = language.lower().strip("<|>")
    return lang if lang in LANGUAGES else TO_LANGUAGE_CODE.get(lang, lang)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


class _Decoder:
    """What every engine shares: the card's token limits, grouping segments into batches, the tokenizer and
    feature extractor of the model folder, and its language tokens."""

    engine = ""

    def __init__(self, options: DecodeOptions, device: str):
        self.options = options
        self.device = device
        self.batch_size = 1
        self.load_s = 0.0

    def _load_processor(self) -> None:
        """Tokenizer, feature extractor and generation config of ``options.model`` (a folder or a hub id)."""
        from transformers import GenerationConfig, WhisperProcessor

        model = self.options.model
        if model.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise RuntimeError(f"cannot load the model {model!r}: no such folder")
        try:
            self.processor = WhisperProcessor.from_pretrained(model)
            gc = GenerationConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise model_error(model, e) from e
        self.tokenizer = self.processor.tokenizer
        self.feature_extractor = self.processor.feature_extractor
        self.generation_config = gc
        self.eos = gc.eos_token_id
        self.lang_by_token = {v: k[2:-2] for k, v in (getattr(gc, "lang_to_id", None) or {}).items()}
        self.task_ids = dict(getattr(gc, "task_to_id", None) or {})
        self.prompt_ids = {gc.decoder_start_token_id, getattr(gc, "no_timestamps_token_id", None),
                           *self.lang_by_token, *self.task_ids.values()} - {None}
        no_speech = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|nospeech|>", "<|nocaptions|>")]
        self.no_speech_id = next((t for t in no_speech if t is not None and t != self.tokenizer.unk_token_id), None)

    def decode(self, inputs: Sequence[SegmentInput]) -> list[SegmentOutput]:
        """Decode segments in batches that share one token limit and one language; results in input order."""
        groups: dict[tuple[str | None, int], list[int]] = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[(x.language, x.max_new_tokens)].append(i)
        out: list[SegmentOutput | None] = [None] * len(inputs)
        for (language, limit), idx in sorted(groups.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                for i, r in zip(chunk, self._generate([inputs[i].audio for i in chunk], language, limit)):
                    out[i] = r
        return out  # type: ignore[return-value]

    def _features(self, audios: list[np.ndarray], tensors: str):
        """Whisper's log-mel features of each segment, padded to 30 s, as the card's pipeline computes them."""
        return self.feature_extractor(
            [a if len(a) else np.zeros(1, np.float32) for a in audios], sampling_rate=SAMPLE_RATE,
            return_tensors=tensors, return_attention_mask=True)

    def _generate(self, audios: list[np.ndarray], language: str | None, limit: int) -> list[SegmentOutput]:
        raise NotImplementedError


def require_safetensors(folder, model: str) -> None:
    """Refuse a local model folder without .safetensors weights (krasr-batch never loads pickled weights)."""
    from pathlib import Path

    if not any(Path(folder).glob("*.safetensors")):
        raise RuntimeError(f"cannot load the model {model!r}: the folder holds no .safetensors weights "
                           "(krasr-batch loads safetensors only)")


def check_model(options: DecodeOptions) -> None:
    """Fail fast, in the driver, with one clear RuntimeError when ``options.model`` cannot be used: its
    tokenizer, feature extractor and generation config load, a local folder holds safetensors weights, and
    the CTranslate2 engine has its converted copy (converted here once, so replicas find it cached)."""
    from pathlib import Path

    local = Path(options.model).expanduser()
    if local.is_dir():
        require_safetensors(local, options.model)
    _Decoder(options, "cpu")._load_processor()
    if options.engine == "ctranslate2":
        from krasr_batch.engine_ct2 import converted_model

        converted_model(options.model)


def load_decoder(options: DecodeOptions, device: str = "auto", threads: int | None = None) -> _Decoder:
    """One model replica of ``options.engine``; ``threads``: CPU threads it may use (None: the engine's default)."""
    if options.engine == "ctranslate2":
        from krasr_batch.engine_ct2 import CTranslate2Decoder

        return CTranslate2Decoder(options, device, threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return WhisperDecoder(options, device)


class WhisperDecoder(_Decoder):
    """The transformers engine: one model replica, the card's very call. Load once, then ``decode(inputs)``."""

    engine = "transformers"

    def __init__(self, options: DecodeOptions, device: str = "auto"):
        import torch
        from transformers import WhisperForConditionalGeneration

        super().__init__(options, resolve_device(device))
        if options.dtype == "int8" and self.device != "cpu":
            raise RuntimeError("--dtype int8 (dynamic quantization) runs on the CPU only; use float16 on a GPU")
        if options.dtype == "auto":
            self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        elif options.dtype == "int8":
            self.dtype = torch.float32  # activations stay float32; the linear layers' weights become int8
        else:
            self.dtype = getattr(torch, options.dtype)
        t0 = time.perf_counter()
        self._load_processor()
        try:
            self.model = WhisperForConditionalGeneration.from_pretrained(
                options.model, dtype=self.dtype, attn_implementation="sdpa", use_safetensors=True,
                trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise model_error(options.model, e) from e
        self.model.to(self.device).eval()
        if options.dtype == "int8":
            from torch.ao.quantization import quantize_dynamic

            self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self._encoded = None
        self.model.model.encoder.register_forward_hook(self._keep_encoder_output)
        # on a CPU, batching beam search measured no gain (1 thread, whisper-base: 41.3 s for 16 clips one by
        # one, 44.6 s in fours), so CPU replicas decode one segment at a time; GPUs want wide batches
        self.batch_size = options.batch_size or (16 if self.device == "cuda" else 1)
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s on %s (%s) in %.1f s", options.model, self.device, self.dtype, self.load_s)

    def _generate(self, audios: list[np.ndarray], language: str | None, limit: int) -> list[SegmentOutput]:
        import torch

        t0 = time.perf_counter()
        feats = self._features(audios, "pt")
        kwargs = dict(task=self.options.task, num_beams=self.options.beams,
                      no_repeat_ngram_size=self.options.no_repeat_ngram_size,
                      repetition_penalty=self.options.repetition_penalty, max_new_tokens=limit)
        if language is not None:
            kwargs["language"] = language
        with torch.inference_mode():
            from transformers import LogitsProcessorList

            features = feats["input_features"].to(self.device, self.dtype)
            self._encoded = None
            recorder = _StepRecorder(max(2, 2 * self.options.beams))
            out = self.model.generate(
                features, attention_mask=feats["attention_mask"].to(self.device), return_dict_in_generate=True,
                logits_processor=LogitsProcessorList([recorder]), **kwargs)
            encoded, self._encoded = self._encoded, None  # kept by the hook for the no-speech step
            seqs = out if isinstance(out, torch.Tensor) else out["sequences"]
            if seqs.shape[0] != len(audios) and len(audios) > 1:  # seen with random weights: decode one by one
                log.warning("generate() returned %d rows for %d inputs; decoding them one at a time",
                            seqs.shape[0], len(audios))
                return [r for a in audios for r in self._generate([a], language, limit)]
            rows = seqs.tolist()
            spans = [self._split(row) for row in rows]
            signals = self._signals(out, encoded, seqs, spans, recorder)
        decode_s = time.perf_counter() - t0
        texts = self.tokenizer.batch_decode(seqs.cpu(), skip_special_tokens=True)
        results = []
        for text, (start, end, ended, lang), (avg_lp, nsp) in zip(texts, spans, signals):
            results.append(SegmentOutput(text.strip(), lang or language_code(language), end - start, not ended,
                                         decode_s, len(audios), avg_lp, nsp))
        return results

    def _keep_encoder_output(self, module, args, output) -> None:
        """Forward hook: keep the encoder's output of the generate() call for the no-speech step."""
        self._encoded = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def _split(self, row: list[int]) -> tuple[int, int, bool, str]:
        """(first text token, end of text, ended with end-of-text, language code) of one output row."""
        k, lang = 0, ""
        while k < len(row) and row[k] in self.prompt_ids:  # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>
            lang = self.lang_by_token.get(row[k], lang)
            k += 1
        end = row.index(self.eos, k) if self.eos in row[k:] else len(row)
        return k, end, end < len(row), lang

    def _signals(self, out, encoded, seqs, spans, recorder: _StepRecorder) -> list[tuple[float | None, float | None]]:
        """Whisper's avg_logprob and no_speech_prob for each output row, at almost no cost.

        avg_logprob: the mean log-probability of the text tokens and end-of-text as the decoder scored them
        when it chose them (Whisper's own definition; the scores are after the card's logits processors, so a
        repeated token carries the repetition penalty), looked up in what ``recorder`` kept of every step and
        followed through beam search's ``beam_indices``. no_speech_prob: one decoder step at
        <|startoftranscript|> over generate()'s own encoder output (kept by a forward hook).
        """
        import torch

        n = len(spans)
        avg: list[float | None] = [None] * n
        nsp: list[float | None] = [None] * n
        prompt = spans[0][0]
        if recorder.ids and prompt and all(sp[0] == prompt for sp in spans):
            ids = torch.stack(recorder.ids)  # (steps, rows, k)
            vals = torch.stack(recorder.values)
            steps = ids.shape[0]
            beams = getattr(out, "beam_indices", None) if not isinstance(out, torch.Tensor) else None
            for b, (start, end, ended, _) in enumerate(spans):
                m = min(end - start + (1 if ended else 0), steps)  # text tokens, and end-of-text when there
                if m <= 0:
                    continue
                t = torch.arange(m, device=ids.device)
                rows = beams[b, :m].to(ids.device) if beams is not None else torch.full_like(t, b)
                if (rows < 0).any():
                    continue
                tokens = seqs[b, start:start + m].to(ids.device)
                hit = ids[t, rows] == tokens[:, None]  # (m, k): the chosen token among the row's best k
                if hit.any(dim=1).all():
                    avg[b] = float((vals[t, rows] * hit).sum() / m)
        if encoded is not None and self.no_speech_id is not None and encoded.shape[0] == seqs.shape[0]:
            hidden = self.model.model.decoder(input_ids=seqs[:, :1], encoder_hidden_states=encoded,
                                              use_cache=False).last_hidden_state
            probs = torch.softmax(self.model.proj_out(hidden[:, 0]).float(), dim=-1)[:, self.no_speech_id]
            nsp = [float(x) for x in probs.cpu()]
        return list(zip(avg, nsp))


class _StepRecorder:
    """A logits processor (placed after the card's) that keeps, per decoding step and hypothesis, the k best
    tokens and their processed log-probabilities; beam search only ever chooses among a row's 2*beams best."""

    def __init__(self, k: int):
        self.k = k
        self.ids: list = []
        self.values: list = []

    def __call__(self, input_ids, scores):
        v, i = scores.topk(self.k, dim=-1)
        self.ids.append(i)
        self.values.append(v)
        return scores
