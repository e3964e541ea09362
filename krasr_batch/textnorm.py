"""Text normalization for error rates, as the KRASR card evaluates: lowercase, punctuation removed,
whitespace normalised; Kazakh-specific letters (ә ғ қ ң ө ұ ү һ і) and Russian words kept as they are."""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")


def normalize(text: str | None) -> str:
    if not text:
        return ""
    text = unicodedata.normalize("NFC", text).lower()
    # punctuation and symbols become spaces (so "слово,слово" is two words); letters and digits stay
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return _SPACE.sub(" ", text).strip()
