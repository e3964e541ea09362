"""Hallucination-like segments: pure checks that mirror openai/whisper's own guards.

Whisper's ``transcribe()`` re-decodes a window when its text compresses too well (``compression_ratio``
above 2.4: the text repeats itself) or when the model was unsure of it (``avg_logprob`` below -1.0), and
drops a window as silence when ``no_speech_prob`` is above 0.6 and the model was also unsure. krasr-batch
decodes each segment once, so these checks do not change the output; they flag segments worth a look.

The rule (:func:`suspect`): a segment with non-empty text is suspect when any of these holds, each a name
that :func:`suspect_reasons` returns:

- ``ngram_loop``: the same 1- to 4-word n-gram repeated at least 4 times in a row (words as
  :func:`krasr_batch.textnorm.normalize` gives them), or a character sequence of 1 to 10 characters
  repeated at least 5 times in a row over at least 20 characters (``"ааааааааааааааааааааа"``,
  ``"!!!!!…"``, ``"хахахаха…"``);
- ``compression_ratio``: ``compression_ratio(text) > 2.4`` (zlib over UTF-8 bytes, as whisper computes it);
- ``avg_logprob``: ``avg_logprob < -1.0`` (only when known);
- ``no_speech``: ``no_speech_prob > 0.6`` and the model was unsure (``avg_logprob`` at most -1.0, or
  unknown): whisper's own "this window is silence" rule, so text on it is likely invented (only when known);
- ``too_long``: more characters than ``25 * duration_s + 20`` (far more text than anyone says in that
  much audio; only when the duration is known).

Empty text is never suspect. Every function is pure and cheap; none needs the model.
"""

from __future__ import annotations

import logging
import re
import zlib

from krasr_batch.textnorm import normalize

log = logging.getLogger(__name__)

COMPRESSION_RATIO_THRESHOLD = 2.4  # whisper's compression_ratio_threshold
LOGPROB_THRESHOLD = -1.0  # whisper's logprob_threshold
NO_SPEECH_THRESHOLD = 0.6  # whisper's no_speech_threshold
MAX_NGRAM = 4
MIN_NGRAM_REPEATS = 4
MAX_CHAR_UNIT = 10
MIN_CHAR_REPEATS = 5
MIN_CHAR_LOOP_SPAN = 20
MAX_CHARS_PER_S = 25.0
CHARS_SLACK = 20

_SPACE = re.compile(r"\s+")
_CHAR_LOOP = re.compile(rf"(.{{1,{MAX_CHAR_UNIT}}}?)\1{{{MIN_CHAR_REPEATS - 1},}}", re.DOTALL)


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes, exactly as whisper's ``get_compression_ratio``."""
    text_bytes = text.encode("utf-8")
    return len(text_bytes) / len(zlib.compress(text_bytes))


def _word_loop(words: list[str], max_n: int, min_repeats: int) -> bool:
    """True when some n-gram (n <= max_n) occurs min_repeats times back to back."""
    for n in range(1, max_n + 1):
        span = n * min_repeats
        for i in range(len(words) - span + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, min_repeats)):
                return True
    return False


def _char_loop(text: str, min_span: int) -> bool:
    """True when a 1..10-character sequence repeats (5+ times) over at least min_span characters."""
    flat = _SPACE.sub(" ", text.lower()).strip()
    return any(m.end() - m.start() >= min_span for m in _CHAR_LOOP.finditer(flat))


def has_ngram_loop(text: str | None, max_n: int = MAX_NGRAM, min_repeats: int = MIN_NGRAM_REPEATS,
                   min_char_span: int = MIN_CHAR_LOOP_SPAN) -> bool:
    """A repetition loop: a 1..max_n word n-gram repeated min_repeats times in a row, or a character loop."""
    if not text:
        return False
    return _word_loop(normalize(text).split(), max_n, min_repeats) or _char_loop(text, min_char_span)


def too_long_for_duration(text: str | None, duration_s: float | None, max_chars_per_s: float = MAX_CHARS_PER_S,
                          slack_chars: int = CHARS_SLACK) -> bool:
    """More characters (whitespace collapsed) than ``max_chars_per_s * duration_s + slack_chars``.

    False when the duration is unknown (None or NaN).
    """
    if not text or duration_s is None or duration_s != duration_s:
        return False
    n = len(_SPACE.sub(" ", text).strip())
    return n > max_chars_per_s * max(duration_s, 0.0) + slack_chars


def _known(x: float | None) -> bool:
    return x is not None and x == x  # not None, not NaN


def suspect_reasons(text: str | None, duration_s: float | None, avg_logprob: float | None = None,
                    no_speech_prob: float | None = None) -> list[str]:
    """The names of the rules (module docstring) that the segment breaks; empty when it looks fine."""
    if not text or not text.strip():
        return []
    reasons = []
    if has_ngram_loop(text):
        reasons.append("ngram_loop")
    if compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD:
        reasons.append("compression_ratio")
    if _known(avg_logprob) and avg_logprob < LOGPROB_THRESHOLD:
        reasons.append("avg_logprob")
    unsure = not _known(avg_logprob) or avg_logprob <= LOGPROB_THRESHOLD
    if _known(no_speech_prob) and no_speech_prob > NO_SPEECH_THRESHOLD and unsure:
        reasons.append("no_speech")
    if too_long_for_duration(text, duration_s):
        reasons.append("too_long")
    return reasons


TRUNCATION_CAUSES = ("repetition", "did_not_fit")


def truncation_cause(text: str | None, truncated: bool) -> str | None:
    """Why a segment stopped at its token limit: ``"repetition"`` when its text is a repetition loop (an n-gram
    or character loop, or text that compresses like one), ``"did_not_fit"`` when it is not, so the limit cut
    real words short; None for a segment that ended by itself."""
    if not truncated:
        return None
    if has_ngram_loop(text) or (bool(text) and compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD):
        return "repetition"
    return "did_not_fit"


def suspect(text: str | None, duration_s: float | None, avg_logprob: float | None = None,
            no_speech_prob: float | None = None) -> bool:
    """True when the segment looks hallucination-like (any rule of the module docstring)."""
    return bool(suspect_reasons(text, duration_s, avg_logprob, no_speech_prob))
