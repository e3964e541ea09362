"""Text normalization for error rates, as the KRASR card evaluates: lowercase, punctuation removed,
whitespace normalised; Kazakh-specific letters (ә ғ қ ң ө ұ ү һ і) and Russian words kept as they are.

Punctuation and symbols (Unicode categories P*, S*) become spaces, so ``"слово,слово"`` is two words;
invisible format characters (category Cf: zero-width spaces, soft hyphens, BOMs) are dropped; letters,
marks and digits stay. Text is NFC-composed first, so a letter typed as base + combining mark equals its
precomposed form.
"""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")


def _map_char(ch: str) -> str:
    cat = unicodedata.category(ch)
    if cat[0] in "PS":
        return " "
    if cat == "Cf":
        return ""
    return ch


def normalize(text: str | None) -> str:
    """Lowercase, punctuation and symbols to spaces, whitespace collapsed; '' for None or empty text."""
    if not text:
        return ""
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(_map_char(ch) for ch in text)
    return _SPACE.sub(" ", text).strip()
