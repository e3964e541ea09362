"""Typed run settings: built once from CLI flags and ``jobs/*.yaml`` presets, handed down to every stage.

Stages never read the CLI or the environment themselves; they take the frozen option objects below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from krasr_batch.storage import is_uri

DEFAULT_MODEL = "KRASR/kazakh-russian-asr-whisper-small-full-ft"
MAX_WINDOW_S = 30.0  # Whisper's encoder sees at most 30 s of audio
ENGINES = ("auto", "transformers", "ctranslate2", "torch")  # auto: krasr_batch.engines.choose_engine
# How max_new_tokens is set (krasr_batch.engines.segment_token_limit): "fit" the card's table for a file decoded
# whole (going on to the budget where it cuts real text short: Decoder.decode) and a per-second budget for
# windows cut from longer recordings; "card" the card's table everywhere;
# "none" the model's own limit.
TOKEN_LIMIT_POLICIES = ("fit", "card", "none")


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings. Defaults are the KRASR model card's."""

    model: str = DEFAULT_MODEL
    language: str = "kazakh"  # "auto": Whisper detects the language of each segment
    task: str = "transcribe"
    beams: int = 3
    no_repeat_ngram_size: int = 4
    repetition_penalty: float = 1.12
    token_limit: str = "fit"  # a TOKEN_LIMIT_POLICIES name; True/False (older presets) mean "card"/"none"
    batch_size: int = 0  # segments per model call; 0: the engine's default for the device (engines.base.default_batch_size)
    dtype: str = "auto"  # auto: per engine and device, resolved by each replica (README, --dtype); int8: int8 weights
    # auto: the fastest engine that keeps the card's accuracy on the device (krasr_batch.engines.choose_engine),
    # resolved by the driver before anything is fingerprinted; transformers: the card's own call;
    # ctranslate2: the same weights, converted
    engine: str = "auto"
    word_timestamps: bool = False  # a words/ table: each word's times from the alignment heads (DTW)
    # with language "auto": detect each segment's language among these Whisper codes only; (): all of Whisper's
    languages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "languages", parse_languages(self.languages))
        if isinstance(self.token_limit, bool):
            object.__setattr__(self, "token_limit", "card" if self.token_limit else "none")
        if self.token_limit not in TOKEN_LIMIT_POLICIES:
            raise ValueError(f"token_limit must be one of {', '.join(TOKEN_LIMIT_POLICIES)}, got {self.token_limit!r}")
        if self.beams < 1:
            raise ValueError(f"beams must be at least 1, got {self.beams}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {self.batch_size}")
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be transcribe or translate, got {self.task!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "int8"):
            raise ValueError(f"dtype must be auto, float32, float16, bfloat16 or int8, got {self.dtype!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not self.language:
            raise ValueError("language must not be empty (use 'auto' to let Whisper detect it)")
        if check_language(self.language, "language") is None:  # " AUTO", "Auto": one spelling for engines
            object.__setattr__(self, "language", "auto")


def check_language(value: str, what: str) -> str | None:
    """Whisper's code for ``value`` (a code or a name, any case), None for 'auto'; ValueError for a language
    Whisper does not know."""
    from krasr_batch.engines.vocab import whisper_language  # the table, without transformers

    if value.strip().lower() == "auto":
        return None
    code = whisper_language(value)
    if code is None:
        raise ValueError(f"{what}: Whisper knows no language {value!r} (a code or a name: kk or kazakh, ru or "
                         "russian; auto: detect it)")
    return code


def parse_languages(value: str | list | tuple | None) -> tuple[str, ...]:
    """``--languages``: "kk,ru", "russian, kazakh" or a list -> Whisper codes, sorted: ("kk", "ru").

    Raises ValueError naming a language Whisper does not know (``engines.vocab``'s table, held equal to
    transformers' by a test, without importing transformers).
    """
    if not value:
        return ()
    from krasr_batch.engines.vocab import whisper_language

    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    items = [v.strip().lower().strip("<|>") for v in items if v.strip()]
    codes: list[str] = []
    for v in items:
        code = whisper_language(v)
        if code is None:
            raise ValueError(f"languages: Whisper knows no language {v!r} (give codes or names: kk,ru or kazakh,russian)")
        if code not in codes:
            codes.append(code)
    return tuple(sorted(codes))  # the order says nothing: one fingerprint for one set


@dataclass(frozen=True)
class SegmentOptions:
    """Speech detection (Silero VAD) and how speech is grouped into model windows."""

    max_segment_s: float = MAX_WINDOW_S
    vad_threshold: float = 0.5
    min_speech_duration_ms: int = 250
    min_silence_duration_ms: int = 100
    speech_pad_ms: int = 400  # silence kept around each window, taken from the pauses beside it
    whole_file_max_s: float = MAX_WINDOW_S  # a file with speech no longer than this is one segment, as the card decodes it
    # a pause inside a window keeps at most this much of itself (its middle is skipped), so windows hold
    # speech, not silence: fewer windows, one encoder pass each (segment.plan_windows)
    max_pause_s: float = 1.0
    # a quiet file (its loudest 32 ms below segment.QUIET_BELOW_DBFS) is raised by up to this many dB, for the
    # VAD and the model (segment.quiet_gain_db); 0: the audio as it is, as the card's call takes it
    max_gain_db: float = 50.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.max_segment_s <= MAX_WINDOW_S:
            raise ValueError(f"max_segment_s must be between 1 and {MAX_WINDOW_S:g}, got {self.max_segment_s:g}")
        if not 0.0 < self.vad_threshold < 1.0:
            raise ValueError(f"vad_threshold must be between 0 and 1, got {self.vad_threshold}")
        if not 0.0 <= self.max_pause_s <= MAX_WINDOW_S:
            raise ValueError(f"max_pause_s must be between 0 and {MAX_WINDOW_S:g}, got {self.max_pause_s:g}")
        if not 0.0 <= self.max_gain_db <= 100.0:
            raise ValueError(f"max_gain_db must be between 0 and 100, got {self.max_gain_db:g}")
        if self.whole_file_max_s > self.max_segment_s:
            object.__setattr__(self, "whole_file_max_s", self.max_segment_s)


@dataclass(frozen=True)
class ResourceOptions:
    """Where and how wide the pipeline runs. None of these change the output."""

    address: str | None = None  # None (or "local", as Ray spells it): an embedded local Ray
    actors: int = 0  # model replicas; 0: one per GPU, else one replica per CPU that memory holds (cluster.plan_placement)
    num_cpus: int | None = None  # CPUs for the embedded local Ray (default: all)
    device: str = "auto"  # auto, cpu or cuda
    flush_s: float = 20.0  # how often finished files are committed to Parquet
    flush_files: int = 2000
    max_failed_fraction: float = 0.1
    min_files_for_failure_check: int = 100
    input_root: str | None = None
    actor_resource: str | None = None  # a custom Ray resource each model actor needs one unit of (placement)
    ship_code: bool = True  # with address: ship this krasr_batch package to the workers (runtime_env py_modules)
    # stop (exit 1) once nothing has come back for this long while Ray holds requests no node can place; 0: never
    stall_timeout_s: float = 600.0
    # files per Ray Data execution: the driver's memory grows with the files of one execution (Ray Data keeps
    # per-block state until it ends), and each pass starts the model replicas anew (pipeline.orchestrate)
    pass_files: int = 50_000

    def __post_init__(self) -> None:
        if self.pass_files < 1:
            raise ValueError(f"pass_files must be at least 1, got {self.pass_files}")
        if self.address is not None and self.address.strip().lower() in ("", "local"):
            object.__setattr__(self, "address", None)


@dataclass(frozen=True)
class RunSettings:
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    segment: SegmentOptions = field(default_factory=SegmentOptions)
    resources: ResourceOptions = field(default_factory=ResourceOptions)

    def output_fingerprint(self) -> str:
        """Hash of every setting that changes the output; a resumed run must match it."""
        d = dataclasses.asdict(self.decode)
        d.pop("batch_size")  # batching does not change what is decoded
        if d["token_limit"] in ("card", "none"):  # as runs made before the "fit" policy stamped them
            d["token_limit"] = d["token_limit"] == "card"
        if d["engine"] == "auto":
            raise ValueError("--engine auto must be resolved (krasr_batch.engines.choose_engine) before fingerprinting")
        if d["engine"] == "transformers":
            d.pop("engine")  # the fingerprint of runs made before there was a choice of engine
        for name in ("word_timestamps", "languages"):  # off: the fingerprint of runs made before they existed
            if not d[name]:
                d.pop(name)
        seg = dataclasses.asdict(self.segment)
        if not seg["max_gain_db"]:  # off: the fingerprint of runs made before quiet files were raised
            seg.pop("max_gain_db")
        payload = json.dumps({"decode": d, "segment": seg}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_engine(self, engine: str) -> RunSettings:
        """These settings with ``--engine auto`` replaced by the engine it resolved to."""
        return dataclasses.replace(self, decode=dataclasses.replace(self.decode, engine=engine))


# Preset keys (the CLI flag names with dashes or underscores) mapped to the option they set.
PRESET_KEYS: dict[str, tuple[str, str]] = {
    "model": ("decode", "model"),
    "language": ("decode", "language"),
    "task": ("decode", "task"),
    "beams": ("decode", "beams"),
    "no_repeat_ngram_size": ("decode", "no_repeat_ngram_size"),
    "repetition_penalty": ("decode", "repetition_penalty"),
    "token_limit": ("decode", "token_limit"),
    "batch_size": ("decode", "batch_size"),
    "dtype": ("decode", "dtype"),
    "engine": ("decode", "engine"),
    "word_timestamps": ("decode", "word_timestamps"),
    "languages": ("decode", "languages"),
    "max_segment_s": ("segment", "max_segment_s"),
    "vad_threshold": ("segment", "vad_threshold"),
    "speech_pad_ms": ("segment", "speech_pad_ms"),
    "max_pause_s": ("segment", "max_pause_s"),
    "max_gain_db": ("segment", "max_gain_db"),
    "min_silence_duration_ms": ("segment", "min_silence_duration_ms"),
    "min_speech_duration_ms": ("segment", "min_speech_duration_ms"),
    "address": ("resources", "address"),
    "actors": ("resources", "actors"),
    "num_cpus": ("resources", "num_cpus"),
    "device": ("resources", "device"),
    "max_failed_fraction": ("resources", "max_failed_fraction"),
    "input_root": ("resources", "input_root"),
    "actor_resource": ("resources", "actor_resource"),
    "ship_code": ("resources", "ship_code"),
    "flush_s": ("resources", "flush_s"),
    "flush_files": ("resources", "flush_files"),
    "stall_timeout": ("resources", "stall_timeout_s"),
    "pass_files": ("resources", "pass_files"),
}


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read a ``jobs/NAME.yaml`` preset into ``{option: value}``; unknown keys are an error.

    Besides options, a preset may hold ``manifest`` and ``out`` (paths relative to the preset file).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read job preset {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"job preset {path} must be a mapping of option: value")
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k in ("manifest", "out"):
            out[k] = str(value) if is_uri(str(value)) else str((path.parent / str(value)).resolve())
        elif k == "no_token_limit":
            out["token_limit"] = "none" if value else "fit"
        elif k in PRESET_KEYS:
            expected = _preset_type_error(k, value)
            if expected:
                raise ValueError(f"job preset {path}: {key}: expected {expected}, got {value!r}")
            out[k] = value
        else:
            raise ValueError(f"job preset {path}: unknown option {key!r} (known: {', '.join(sorted(PRESET_KEYS))})")
    if "model" in out and not _looks_like_hub_id(str(out["model"])):
        candidate = (path.parent / str(out["model"])).resolve()
        if candidate.exists():
            out["model"] = str(candidate)
    return out


_PRESET_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {  # a field's annotation -> (in words, YAML types)
    "int": ("a whole number", (int,)), "float": ("a number", (int, float)), "bool": ("true or false", (bool,)),
    "str": ("text", (str,)), "str | None": ("text", (str, type(None))), "int | None": ("a whole number", (int, type(None))),
    "tuple[str, ...]": ("a list or comma-separated text", (str, list, tuple)),
}


def _preset_type_error(key: str, value: Any) -> str | None:
    """What a preset's ``key`` should hold, in words, when ``value`` is not of its type (YAML typed it); None
    when it is. Before, ``beams: three`` ended the command with "'<' not supported between 'str' and 'int'"."""
    group, name = PRESET_KEYS[key]
    cls = {"decode": DecodeOptions, "segment": SegmentOptions, "resources": ResourceOptions}[group]
    annotation = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    words, types = _PRESET_TYPES.get(str(annotation), ("", (object,)))
    if value is None or key == "token_limit" and isinstance(value, bool):  # null: the default; older presets:
        return None                                                     # true / false for card / none
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    return None if ok else words


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def build_settings(options: dict[str, Any]) -> RunSettings:
    """Build RunSettings from a flat ``{option: value}`` mapping (None values are ignored)."""
    groups: dict[str, dict[str, Any]] = {"decode": {}, "segment": {}, "resources": {}}
    for k, v in options.items():
        if v is None or k not in PRESET_KEYS:
            continue
        group, name = PRESET_KEYS[k]
        groups[group][name] = v
    return RunSettings(
        decode=DecodeOptions(**groups["decode"]),
        segment=SegmentOptions(**groups["segment"]),
        resources=ResourceOptions(**groups["resources"]),
    )
