"""What every engine shares, written once: the segment records, the card's token limits and the "fit" policy,
language codes, model errors, the safetensors rule, the device, dtype and batch-size defaults, and the
public :class:`Decoder` base class.

An engine (``transformers.py``, ``ctranslate2.py``) subclasses :class:`Decoder`; ``engines/__init__.py``
imports engines lazily. Nothing here imports torch, transformers or ctranslate2 at import time.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from krasr_batch.audio import SAMPLE_RATE
from krasr_batch.engines.timing import Word
from krasr_batch.quality import truncation_cause
from krasr_batch.settings import MAX_WINDOW_S, TOKEN_LIMIT_POLICIES, DecodeOptions

log = logging.getLogger(__name__)

# (longest segment in seconds, max_new_tokens), from the model card; longer segments get 128.
TOKEN_LIMITS: tuple[tuple[float, int], ...] = ((5.0, 40), (10.0, 64), (15.0, 80), (20.0, 96), (25.0, 112))
TOKEN_LIMIT_LONGEST = 128
TOKEN_LIMIT_UNKNOWN = 96
MODEL_MAX_NEW_TOKENS = 444  # Whisper's 448 target positions less the 4-token prompt


# Token-limit policies (issue 17). "card": the card's table for every segment. "fit" (the default): the
# card's table for a file decoded whole, exactly as the card decodes a short clip (and, where that cuts real text
# short, going on to the budget below: Decoder.decode); a window cut from a longer
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
    which keeps the card's limit under "fit" so the output equals the card's call (where that limit cuts real
    text short, :meth:`Decoder.decode` takes the clip on to the budget a window gets).
    """
    if policy == "none":
        return MODEL_MAX_NEW_TOKENS
    card = max_new_tokens_for(duration_s)
    if policy == "card" or whole_file:
        return card
    if policy != "fit":
        raise ValueError(f"token limit policy must be one of {', '.join(TOKEN_LIMIT_POLICIES)}, got {policy!r}")
    # the budget of the card's own duration bucket's upper edge (5, 10, ... 30 s): six limits, like the card's
    # table, so that segments of one bucket still share a model batch (a batch has one limit)
    edge = next((longest for longest, _ in TOKEN_LIMITS if duration_s <= longest), MAX_WINDOW_S)
    return min(MODEL_MAX_NEW_TOKENS, max(card, math.ceil(FIT_TOKENS_PER_S * max(edge, duration_s))))


@dataclass(frozen=True)
class SegmentInput:
    """One segment to decode: 16 kHz mono float32 samples and the language to force (None: detect).

    ``exact_limit``: the segment must be decoded with ``max_new_tokens`` as the batch's own limit (a file
    decoded whole keeps the card's call). False for a window cut from a longer recording, whose limit is a
    budget against runaway loops: an engine may decode it in a batch with a larger limit and cut its tokens
    at its own (``Decoder.flexible_limits``).
    """

    audio: np.ndarray
    language: str | None
    max_new_tokens: int
    exact_limit: bool = True


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
    # probability of ``language`` at the detection step (right after <|startoftranscript|>), among --languages
    # when given and ``language`` is one of them, else among all the model's languages
    language_prob: float | None = None
    words: tuple[Word, ...] | None = None  # with word timestamps: the words, times from the segment's start
    # the limit the text was decoded at, where it is not the input's: a file decoded whole that its card limit
    # cut short, continued or decoded again to the "fit" budget (Decoder.decode); None: the input's max_new_tokens
    max_new_tokens: int | None = None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def model_error(model: str, cause: Exception) -> RuntimeError:
    reason = " ".join(str(cause).split()).rstrip(".")  # one line: the hub's messages span several
    return RuntimeError(f"cannot load the model {model!r}: {reason}. Give --model a local folder "
                        "(transformers format, safetensors) or a hub id reachable from here.")


def local_model_dir(model: str) -> Path:
    """The model's local folder: ``model`` itself, or the hub snapshot of a hub id (downloaded if needed)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise RuntimeError(f"cannot load the model {model!r}: {'not a' if path.exists() else 'no such'} folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, no access: one clear message
        raise model_error(model, e) from e


def language_code(language: str | None) -> str:
    """Whisper's code for a language name or code ("kazakh" -> "kk"); "" when unknown."""
    from krasr_batch.engines.vocab import whisper_language

    if not language:
        return ""
    return whisper_language(language) or language.strip().lower().strip("<|>")


def no_nvidia_gpu() -> bool:
    """True when this machine certainly has no NVIDIA GPU (no driver files and no CUDA_VISIBLE_DEVICES), so
    that ``--device auto`` need not import torch (about 2 s) to learn that it runs on CPUs."""
    import glob

    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/proc/driver/nvidia")
                or os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"))


def resolve_device(device: str = "auto") -> str:
    if device == "cpu" or (device == "auto" and no_nvidia_gpu()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def default_dtype_name(dtype: str, device: str) -> str:
    """``--dtype auto`` is float16 on CUDA and float32 on a CPU, in every engine."""
    return ("float16" if device == "cuda" else "float32") if dtype == "auto" else dtype


# Segments per CTranslate2 call on a CPU replica, and the threads of one such replica: chosen by measurement
# (benchmarks/ct2_layout.py; BENCHMARKS.md, block ct2-cpu-layout). CTranslate2's C++ beam search turns a batch
# into matrix-matrix products, so unlike transformers' generate() it gains from batching on a CPU.
CT2_CPU_BATCH = 16


# windows per model call of the torch engine on a GPU: the best of 64, 128 and 192 on an H100 with the KRASR
# model's shape (BENCHMARKS.md, block gpu-check); a window's cross-attention keys and values take 55 MB in
# float16, so 64 windows hold 3.5 GB
TORCH_GPU_BATCH = 64


def model_config(model: str) -> dict:
    """The model's ``config.json``: from its folder, or for a hub id from the hub's cache, else the hub (a cached
    copy is read without asking the hub, which retries for about 20 s where it cannot be reached)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return json.loads((folder / "config.json").read_text())
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    path = cached if isinstance(cached, str) else hf_hub_download(model, "config.json")
    return json.loads(Path(path).read_text())


def model_languages(model: str) -> frozenset[str] | None:
    """The Whisper codes of the model's language tokens, from its folder's ``generation_config.json``; None
    where this machine cannot read it (a hub id, a folder only the cluster's nodes have)."""
    from krasr_batch.engines.vocab import generation_config

    try:
        gc = generation_config(Path(model).expanduser())
    except (OSError, ValueError, TypeError):  # no such file, not JSON, not an object
        return None
    return frozenset(k[2:-2] for k in getattr(gc, "lang_to_id", None) or {}) or None  # as Decoder reads them


def whisper_parameters(config: dict) -> int:
    """Whisper's parameter count from its ``config.json`` (transformers' ``WhisperConfig`` keys)."""
    d, mels = config["d_model"], config.get("num_mel_bins", 80)
    f_enc, f_dec = config.get("encoder_ffn_dim", 4 * d), config.get("decoder_ffn_dim", 4 * d)
    positions = config.get("max_source_positions", 1500) + config.get("max_target_positions", 448)
    return (3 * mels * d + 3 * d * d + positions * d + config["vocab_size"] * d
            + config["encoder_layers"] * (4 * d * d + 2 * d * f_enc)
            + config["decoder_layers"] * (8 * d * d + 2 * d * f_dec))


# what a CPU replica holds besides its model's tensors: Python, torch, the engine's libraries, and a model call's
# scratch: one replica of a model with next to no weights (tiny-random) peaks at 565 MiB (torch) to 634 MiB
# (transformers, which imports more); BENCHMARKS.md, "A replica's memory, refitted (stop 45)"
REPLICA_RUNTIME_BYTES = {"torch": 512 * 2**20, "ctranslate2": 512 * 2**20, "transformers": 640 * 2**20}
# the encoder's activations a window of a model call holds at its peak, in units of one window's feed-forward
# hidden layer (frames x encoder_ffn_dim values): the encoder runs a call's windows as one batch
ENCODER_ACTIVATIONS = 4


def replica_memory_bytes(config: dict, engine: str, batch: int, beams: int, dtype: str = "bfloat16") -> int:
    """A CPU replica's peak resident memory, estimated from the model's shape: a fixed part (the runtime, and
    the weights as the engine loads them) and, for each window of a model call, its encoder activations, its
    cross-attention keys and values (1500 frames) and its beams' self-attention caches (the model's 448
    positions: the worst case). ``dtype``: the torch engine's (float32 doubles its keys, values and
    activations).

    Fitted to the peaks ``benchmarks/replica_memory.py`` measured over three shapes (tiny-random, whisper-base,
    and small-random, the KRASR model's; 16 windows, 1 with transformers; BENCHMARKS.md, "A replica's memory,
    refitted (stop 45)"): each estimate at or above its peak, for the KRASR shape by at most a fifth above the
    highest of two CPUs' (torch 3.80 GiB against 3.31 and 3.24 measured, CTranslate2 5.19 against 4.93 and
    5.14, transformers 3.23 against 3.18 and 2.53: its float32 generate() kept 1.4 GiB more on the AMD EPYC);
    whisper-base, whose trained weights end windows at many steps, peaks higher for its size (1.65 GiB with
    torch against an estimate of 1.77)."""
    p = whisper_parameters(config)
    kv = 2 * config["decoder_layers"] * config["d_model"]  # the values one position holds over the layers
    frames, positions = config.get("max_source_positions", 1500), config.get("max_target_positions", 448)
    activations = ENCODER_ACTIVATIONS * frames * config.get("encoder_ffn_dim", 4 * config["d_model"])
    if engine == "torch":  # bfloat16 weights and cross-attention shared by a window's beams, float32 self-attention
        wide = dtype == "float32"
        fixed = (3.5 if wide else 2) * p
        window = kv * ((4 if wide else 2) * frames + 4 * beams * positions) + (4 if wide else 2) * activations
    elif engine == "ctranslate2":  # float32 decoder, the torch encoder (bfloat16) beside it
        fixed, window = 4.5 * p, kv * (4 * frames + 4 * beams * positions) + 2 * activations
    else:  # transformers' float32 generate(): every beam with its own cross-attention keys and values
        engine = "transformers"
        fixed, window = 9.5 * p, kv * 4 * beams * (frames + positions) + 4 * activations
    return int(fixed) + batch * window + REPLICA_RUNTIME_BYTES[engine]


def default_batch_size(batch_size: int, device: str, engine: str = "transformers") -> int:
    """Segments per model call: ``--batch-size``, else on a GPU :data:`TORCH_GPU_BATCH` with the torch engine
    and 16 with transformers, and on a CPU :data:`CT2_CPU_BATCH` with CTranslate2 and the torch engine (both
    batch windows across files) and 1 with transformers.

    On a CPU, batching beam search measured no gain in transformers (1 thread, whisper-base: 41.3 s for 16
    clips one by one, 44.6 s in fours), so its CPU replicas decode one segment at a time; GPUs want wide batches.
    """
    if batch_size:
        return batch_size
    if device == "cuda":
        return TORCH_GPU_BATCH if engine == "torch" else 16
    return CT2_CPU_BATCH if engine in ("ctranslate2", "torch") else 1


def require_safetensors(folder, model: str) -> None:
    """Refuse a local model folder without .safetensors weights (krasr-batch never loads pickled weights)."""
    if not any(Path(folder).glob("*.safetensors")):
        raise RuntimeError(f"cannot load the model {model!r}: the folder holds no .safetensors weights "
                           "(krasr-batch loads safetensors only)")


def _hertz_to_mel(freq: np.ndarray) -> np.ndarray:
    """The Slaney mel scale (linear below 1 kHz, logarithmic above), as librosa and transformers compute it."""
    mels = 3.0 * freq / 200.0
    log = freq >= 1000.0
    mels[log] = 15.0 + np.log(freq[log] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log = mels >= 15.0
    freq[log] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[log] - 15.0))
    return freq


def mel_filters(n_fft: int, n_mels: int, sampling_rate: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters, (n_fft // 2 + 1, n_mels): Whisper's (and librosa's) filter bank."""
    edges = _mel_to_hertz(np.linspace(_hertz_to_mel(np.array([0.0]))[0],
                                      _hertz_to_mel(np.array([sampling_rate / 2]))[0], n_mels + 2))
    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    diff = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    filters = np.maximum(0.0, np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))
    return filters * (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[None, :]


FEATURE_CONFIG_FILES = ("preprocessor_config.json", "processor_config.json")


def feature_extractor_config(model: Path) -> dict | None:
    """The feature extractor's settings from either file transformers writes (faster-whisper reads n_mels)."""
    pre = model / FEATURE_CONFIG_FILES[0]
    if pre.exists():
        return json.loads(pre.read_text())
    proc = model / FEATURE_CONFIG_FILES[1]
    if proc.exists():
        return json.loads(proc.read_text()).get("feature_extractor")
    return None


class NumpyLogMel:
    """Whisper's log-mel features in numpy, as transformers' WhisperFeatureExtractor computes them without torch
    (its ``_np_extract_fbank_features``: a centred STFT with a periodic Hann window, Slaney mel filters, log10,
    the 8-decade floor), on 30 s windows, zero-padded. Neither torch nor transformers is imported: a CTranslate2
    replica starts without either. Within 2e-5 of transformers' extractor (tested)."""

    def __init__(self, feature_size: int = 80, sampling_rate: int = SAMPLE_RATE, hop_length: int = 160,
                 chunk_length: int = 30, n_fft: int = 400, **_):
        self.feature_size, self.sampling_rate, self.hop_length, self.n_fft = feature_size, sampling_rate, hop_length, n_fft
        self.n_samples = chunk_length * sampling_rate
        self.window = np.hanning(n_fft + 1)[:-1]  # periodic
        self.mel_filters = mel_filters(n_fft, feature_size, sampling_rate)

    @classmethod
    def from_pretrained(cls, model: str) -> NumpyLogMel:
        folder = Path(model).expanduser()
        if not folder.is_dir():  # a hub id: its config files, in their snapshot folder
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            for name in FEATURE_CONFIG_FILES:  # in feature_extractor_config's order: the first found is read
                try:
                    folder = Path(hf_hub_download(model, name)).parent
                    break
                except EntryNotFoundError:
                    continue
        config = feature_extractor_config(folder) if folder.is_dir() else None
        if config is None:
            raise OSError(f"{model} has no preprocessor_config.json (the feature extractor's settings)")
        return cls(**config)

    def _log_mel(self, audio: np.ndarray) -> np.ndarray:
        half = self.n_fft // 2
        x = np.pad(audio.astype(np.float64), (half, half), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(x, self.n_fft)[::self.hop_length]
        spec = np.fft.rfft(frames * self.window, axis=1).astype(np.complex64)
        power = np.abs(spec, dtype=np.float64) ** 2
        mel = np.log10(np.maximum(1e-10, self.mel_filters.T @ power.T)).astype(np.float32)
        return mel[:, :-1]

    def __call__(self, audios, sampling_rate: int = SAMPLE_RATE, return_tensors: str = "np", **_) -> dict:
        if sampling_rate != self.sampling_rate:
            raise ValueError(f"features need {self.sampling_rate} Hz audio, got {sampling_rate}")
        out = np.empty((len(audios), self.feature_size, self.n_samples // self.hop_length), np.float32)
        for k, audio in enumerate(audios):
            padded = np.zeros(self.n_samples, np.float32)
            n = min(len(audio), self.n_samples)
            padded[:n] = audio[:n]
            spec = self._log_mel(padded)
            spec = np.maximum(spec, spec.max() - 8.0)
            out[k] = (spec + 4.0) / 4.0
        return {"input_features": out}


class Decoder:
    """The public base of every engine: grouping segments into batches of one token limit and one language,
    the tokenizer, feature extractor and generation config of the model folder, and its language tokens.

    An engine subclasses it, sets ``engine`` and ``batch_size`` in ``__init__`` and implements
    ``_generate(audios, language, limit) -> [SegmentOutput]`` for one batch.
    """

    engine = ""

    def __init__(self, options: DecodeOptions, device: str):
        self.options = options
        self.device = device
        self.batch_size = 1
        self.load_s = 0.0
        self.precision = ""  # what the replica resolved --dtype to, e.g. "bfloat16" (set by the engine)

    @property
    def label(self) -> str:
        """``engine/precision`` with no spaces, e.g. ``torch/bfloat16``: recorded with every segment (``worker``),
        so output decoded on nodes that resolved ``--dtype auto`` differently says which rows are which."""
        return f"{self.engine}/{self.precision}" if self.precision else self.engine

    def _load_processor(self, folder: Path, numpy_features: bool = False) -> None:
        """Tokenizer, feature extractor and generation config of ``options.model``, read from ``folder``: its
        local folder (a hub id's snapshot), as :func:`local_model_dir` gives it.

        ``numpy_features``: log-mel features from :class:`NumpyLogMel` instead of transformers'
        WhisperFeatureExtractor, and, when ``folder`` has ``tokenizer.json``, the tokenizer and generation config
        read without transformers (:mod:`krasr_batch.engines.vocab`): an engine that runs on neither torch nor
        transformers (CTranslate2) starts several seconds sooner.
        """
        model = self.options.model
        try:
            if numpy_features and (folder / "tokenizer.json").exists() and (folder / "generation_config.json").exists():
                from krasr_batch.engines.vocab import WhisperText, generation_config

                self.tokenizer = WhisperText(folder)
                self.feature_extractor = NumpyLogMel.from_pretrained(str(folder))
                gc = generation_config(folder)
            else:
                from transformers.generation.configuration_utils import GenerationConfig
                from transformers.models.whisper.tokenization_whisper import WhisperTokenizer

                if numpy_features:
                    self.tokenizer = WhisperTokenizer.from_pretrained(str(folder))
                    self.feature_extractor = NumpyLogMel.from_pretrained(str(folder))
                else:
                    from transformers import WhisperProcessor

                    self.processor = WhisperProcessor.from_pretrained(str(folder))
                    self.tokenizer = self.processor.tokenizer
                    self.feature_extractor = self.processor.feature_extractor
                gc = GenerationConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise model_error(model, e) from e
        self.generation_config = gc
        self.eos = gc.eos_token_id
        self.lang_by_token = {v: k[2:-2] for k, v in (getattr(gc, "lang_to_id", None) or {}).items()}
        self.task_ids = dict(getattr(gc, "task_to_id", None) or {})
        self.prompt_ids = {gc.decoder_start_token_id, getattr(gc, "no_timestamps_token_id", None),
                           *self.lang_by_token, *self.task_ids.values()} - {None}
        no_speech = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|nospeech|>", "<|nocaptions|>")]
        self.no_speech_id = next((t for t in no_speech if t is not None and t != self.tokenizer.unk_token_id), None)
        self.token_by_code = {code: tid for tid, code in self.lang_by_token.items()}
        missing = [c for c in self.options.languages if c not in self.token_by_code]
        if missing:
            raise RuntimeError(f"--languages: the model {model!r} has no language token for {', '.join(missing)}")
        forced = self.options.language
        if forced and forced != "auto" and language_code(forced) not in self.token_by_code:
            raise RuntimeError(f"--language {forced}: the model {model!r} has no language token for it")
        self.alignment_heads = [tuple(h) for h in (getattr(gc, "alignment_heads", None) or [])]
        if self.options.word_timestamps and not self.alignment_heads:
            raise RuntimeError(
                f"--word-timestamps needs the model's alignment heads (the cross-attention heads that follow the "
                f"audio), and the generation config of {model!r} lists none (no 'alignment_heads' in "
                "generation_config.json). Add them to that file (openai/whisper lists them for each size), or run "
                "without --word-timestamps.")

    def _init_prompt(self) -> None:
        """The prompt's tail after the language token (<|task|> <|notimestamps|>), for engines that build
        their prompts (:meth:`_prompt`)."""
        gc = self.generation_config
        task = self.task_ids.get(self.options.task)
        if task is None or getattr(gc, "no_timestamps_token_id", None) is None:
            raise RuntimeError(f"{self.options.model}: its generation config has no task or <|notimestamps|> token")
        self.prompt_tail = [task, gc.no_timestamps_token_id]

    def _prompt(self, code: str) -> list[int]:
        """<|startoftranscript|> <|code|> <|task|> <|notimestamps|> (after :meth:`_init_prompt`)."""
        if code not in self.token_by_code:
            raise ValueError(f"the model has no language token for {code!r}")
        return [self.generation_config.decoder_start_token_id, self.token_by_code[code], *self.prompt_tail]

    def _language_candidates(self, code: str | None = None) -> list[str]:
        """The languages detection chooses among: --languages, else all the model's; a forced language outside
        --languages is weighed against all."""
        langs = list(self.options.languages)
        return langs if langs and (code is None or code in langs) else list(self.token_by_code)

    def detect_language(self, scores: np.ndarray) -> tuple[str, float]:
        """(code, probability) of the likeliest candidate language from one row of first-step scores: the
        decoder's logits right after <|startoftranscript|> (or log-probabilities), indexed by token id;
        softmax over the candidates only, as Whisper's detection masks every other token."""
        codes = self._language_candidates()
        p = _softmax(np.asarray(scores, np.float64)[[self.token_by_code[c] for c in codes]])
        k = int(np.argmax(p))
        return codes[k], float(p[k])

    def language_prob(self, scores: np.ndarray, code: str) -> float | None:
        """The probability of ``code`` among its candidates (see :meth:`detect_language`), or None for a code
        the model has no token for."""
        if code not in self.token_by_code:
            return None
        codes = self._language_candidates(code)
        p = _softmax(np.asarray(scores, np.float64)[[self.token_by_code[c] for c in codes]])
        return float(p[codes.index(code)])

    def _word_decode(self, tokens: list[int]) -> str:
        """How a run of tokens reads, as the segment's text is decoded (special tokens dropped)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # An engine whose batch can hold several languages (each row its own prompt) sets this.
    mixed_languages = False
    # An engine that can decode windows of several token limits in one batch (``exact_limit`` False) at the
    # largest and cut each row at its own sets this.
    flexible_limits = False

    # An engine that continues a clip its card limit cut short from the cut text, in the same model call (the
    # encoder's output still at hand), sets this; the others decode it again from the start (Decoder._refit).
    continues_cut_clips = False

    @classmethod
    def _group_key(cls, x: SegmentInput) -> tuple:
        language = None if cls.mixed_languages and x.language is not None else x.language
        limit = "budget" if cls.flexible_limits and not x.exact_limit else x.max_new_tokens
        return (language is None and x.language is not None, str(language), str(limit))

    @classmethod
    def batch_plan(cls, inputs: Sequence[SegmentInput], batch_size: int) -> list[list[int]]:
        """The model batches :meth:`decode` makes of ``inputs``, as lists of their indices: batches of one group
        (:meth:`_group_key`: one token limit and one language, or as the engine's ``mixed_languages`` and
        ``flexible_limits`` allow), each group's segments by token limit so that similar limits share a batch.
        A class method, so that a benchmark can count an engine's model calls without loading a model."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[cls._group_key(x)].append(i)
        plan = []
        for _, idx in sorted(groups.items(), key=lambda kv: kv[0]):
            idx.sort(key=lambda i: inputs[i].max_new_tokens)
            plan.extend(idx[k:k + batch_size] for k in range(0, len(idx), batch_size))
        return plan

    def decode(self, inputs: Sequence[SegmentInput]) -> list[SegmentOutput]:
        """Decode segments in the batches of :meth:`batch_plan`; results in input order.

        Under the "fit" token-limit policy, a segment decoded at its exact limit (a file decoded whole, at the
        card's limit) that stopped there with real text, not a repetition loop (:meth:`_going_on`), goes on to
        the budget a window of its duration gets (:func:`segment_token_limit`): the card's table cuts dense speech
        short in clips as it does in windows (at 8.7 tokens a second, Kazakh needs more than 64 tokens from 7.4 s
        on). A clip the card's limit does not cut keeps the card's call and text exactly.

        An engine with ``continues_cut_clips`` (torch, CTranslate2) continues the cut text in the same model call:
        the card's tokens are the new search's prompt, so the text is the card's call and what follows it, and
        neither the encoder nor the card's tokens are computed twice (with one beam, exactly the text a decode at
        the budget gives). The others decode the clip again from the start (:meth:`_refit`) and keep the longer
        of the two texts: where the larger limit lets a shorter hypothesis win (one that ends by itself, a
        sentence short of the cut text), the first text is kept, still flagged ``truncated``.
        """
        out = self._decode_batches(inputs)
        if self.options.token_limit == "fit" and not self.continues_cut_clips:
            self._refit(inputs, out)
        return out

    def _decode_batches(self, inputs: Sequence[SegmentInput]) -> list[SegmentOutput]:
        out: list[SegmentOutput | None] = [None] * len(inputs)
        for chunk in self.batch_plan(inputs, self.batch_size):
            for i, r in zip(chunk, self._generate_batch([inputs[i] for i in chunk])):
                out[i] = r
        return out  # type: ignore[return-value]

    def _refit(self, inputs: Sequence[SegmentInput], out: list[SegmentOutput]) -> None:
        """Decode again, at the "fit" budget, the exact-limit segments their limit cut short (see :meth:`decode`).
        The new result's ``decode_s`` carries both calls' shares: ``decode_s / batch_size`` is what the segment
        cost, as the run's model seconds count it."""
        again = {i: SegmentInput(inputs[i].audio, inputs[i].language, budget, exact_limit=False) for i, budget in
                 self._going_on(inputs, [r.truncated for r in out], lambda i: out[i].text).items()}
        if not again:
            return
        log.debug("decoding %d segment(s) again at the fit budget: their card limit cut them short", len(again))
        for i, r in zip(again, self._decode_batches(list(again.values()))):
            first = out[i]
            spent = first.decode_s / max(first.batch_size, 1) + r.decode_s / max(r.batch_size, 1)
            if r.num_tokens >= first.num_tokens:
                out[i] = replace(r, decode_s=spent * max(r.batch_size, 1), max_new_tokens=again[i].max_new_tokens)
            else:  # with room, a shorter hypothesis that ends by itself won (a sentence dropped, unflagged): keep
                out[i] = replace(first, decode_s=spent * max(first.batch_size, 1))  # the longer text, flagged as cut

    def _going_on(self, inputs: Sequence[SegmentInput], truncated: Sequence[bool],
                  text_of: Callable[[int], str]) -> dict[int, int]:
        """The rows that go on past their limit (see :meth:`decode`), each with the "fit" budget it goes on to:
        under the "fit" policy, a segment decoded at its exact limit (not a window: its limit is a budget
        already) that stopped there (``truncated``), whose budget is above its limit, and whose text
        (``text_of(i)``, asked for such rows only) is real text, not a repetition loop (more of a loop is no
        more words)."""
        if self.options.token_limit != "fit":
            return {}
        out = {}
        for i, (x, cut) in enumerate(zip(inputs, truncated)):
            if cut and x.exact_limit:
                budget = segment_token_limit(len(x.audio) / SAMPLE_RATE, False, "fit")
                if budget > x.max_new_tokens and truncation_cause(text_of(i), True) == "did_not_fit":
                    out[i] = budget
        return out

    def _generate_batch(self, batch: list[SegmentInput]) -> list[SegmentOutput]:
        """One model batch (one group of :meth:`decode`); by default one language and one limit."""
        return self._generate([x.audio for x in batch], batch[0].language, batch[0].max_new_tokens)

    def _features(self, audios: list[np.ndarray], tensors: str):
        """Whisper's log-mel features of each segment, padded to 30 s, as the card's pipeline computes them."""
        return self.feature_extractor(
            [a if len(a) else np.zeros(1, np.float32) for a in audios], sampling_rate=SAMPLE_RATE,
            return_tensors=tensors, return_attention_mask=True)

    def _generate(self, audios: list[np.ndarray], language: str | None, limit: int) -> list[SegmentOutput]:
        raise NotImplementedError
