"""The parts of a Whisper tokenizer and generation config a CTranslate2 replica needs, without transformers.

Importing transformers' Whisper tokenizer and ``GenerationConfig`` costs a replica 2 to 3 s of CPU at start
(on a 2-core machine, while the first files are decoded and cut); a CTranslate2 replica only needs to turn
token ids into text, look up a few special tokens and read ``generation_config.json``. The ``tokenizers``
library (a dependency of transformers, already installed) reads the model's ``tokenizer.json``; a model
without one falls back to transformers. Tests hold the text, the language table and the config equal to
transformers'.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

# Whisper's languages, code -> name, as transformers.models.whisper.tokenization_whisper.LANGUAGES
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
# other names for some of them, as in transformers' TO_LANGUAGE_CODE
ALIASES: dict[str, str] = {
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb", "pushto": "ps",
    "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
}
TO_LANGUAGE_CODE: dict[str, str] = {**{name: code for code, name in LANGUAGES.items()}, **ALIASES}

_TIMESTAMP = re.compile(r"<\|(\d+\.\d+)\|>")


class WhisperText:
    """Token ids to text as transformers' ``WhisperTokenizer.decode(ids, skip_special_tokens=True)``.

    Reads the model's ``tokenizer.json`` with the ``tokenizers`` library: special tokens are dropped, a
    ``<|startofprev|>`` prompt is stripped up to ``<|startoftranscript|>``, timestamp tokens are removed
    from the text, and the config's ``clean_up_tokenization_spaces`` is applied.
    """

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        unk = config.get("unk_token") or "<|endoftext|>"
        unk = unk.get("content") if isinstance(unk, dict) else unk
        self.unk_token_id = self._tok.token_to_id(unk)
        self._prev = self._tok.token_to_id("<|startofprev|>")
        self._start = self._tok.token_to_id("<|startoftranscript|>")

    def convert_tokens_to_ids(self, token: str) -> int | None:
        tid = self._tok.token_to_id(token)
        return self.unk_token_id if tid is None else tid

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(t) for t in ids]
        if skip_special_tokens and self._prev is not None and ids and ids[0] == self._prev:
            ids = ids[ids.index(self._start):] if self._start in ids else []
        text = _TIMESTAMP.sub("", self._tok.decode(ids, skip_special_tokens=skip_special_tokens))
        return _clean_up(text) if self.clean_up else text


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def whisper_language(value: str) -> str | None:
    """Whisper's code for a language name or code, any case ("Kazakh", "kk", "<|kk|>" -> "kk"); None for a
    language Whisper does not know."""
    lang = value.strip().lower().strip("<|>")
    return lang if lang in LANGUAGES else TO_LANGUAGE_CODE.get(lang)


def generation_config(folder: str | Path) -> SimpleNamespace:
    """``generation_config.json`` as attributes (``decoder_start_token_id``, ``lang_to_id``, ...)."""
    return SimpleNamespace(**json.loads((Path(folder) / "generation_config.json").read_text(encoding="utf-8")))
