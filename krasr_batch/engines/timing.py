"""Word times, shared by both engines: tokens merged into words as Whisper merges them, and each word's start
and end from the alignment path of its tokens.

Both engines time the text they already chose (the decoding is never touched, so the text with and without
word timing is the same): one teacher-forced decoder pass over ``<|startoftranscript|> <|lang|> <|task|>
<|notimestamps|> text <|endoftext|>``, the cross-attention of the model's alignment heads (its generation
config's ``alignment_heads``), normalised per head, median-filtered (width 7) and averaged, then dynamic time
warping from tokens to encoder frames (20 ms each). CTranslate2 does all of it in ``Whisper.align``; the
transformers and torch engines run the pass, then transformers' median filter and DTW, computed faster
(:func:`words_from_weights`). Each gives, per segment,
the path as ``(text_indices, time_indices)`` over the text tokens and end-of-text, and each text token's
probability (softmax over the text vocabulary), which :func:`words_from_alignment` turns into :class:`Word` s
as openai/whisper's ``timing.py`` does (faster-whisper does the same). The model stage then trims the words,
in the source's timeline, to the VAD's speech (:func:`fit_to_speech`), in both engines alike.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

FRAMES_PER_S = 50  # encoder frames a second: the 10 ms mel hop, halved by the encoder's second convolution
HOP_SAMPLES = 160  # mel hop at 16 kHz
MEDIAN_FILTER_WIDTH = 7
# Whisper's defaults: punctuation that sticks to the word after it / before it
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
NO_SPACE_LANGUAGES = ("zh", "ja", "th", "lo", "my", "yue")  # split at unicode characters, not at spaces
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class Word:
    """One word of a segment, as Whisper gives it.

    ``word`` keeps its leading space, so the segment's words joined with "" are its text (strip it to compare
    or search); ``start_s``/``end_s`` are seconds from the start of the segment's audio; ``probability`` is
    the mean probability of its tokens.
    """

    word: str
    start_s: float
    end_s: float
    probability: float

    def shifted(self, offset_s: float) -> Word:
        return replace(self, start_s=self.start_s + offset_s, end_s=self.end_s + offset_s)


def num_frames(num_samples: int) -> int:
    """Mel frames holding the segment's audio (not the padding to 30 s), as ``align`` wants them."""
    return max(2, int(round(num_samples / HOP_SAMPLES)))


def split_tokens_on_unicode(tokens: Sequence[int], decode: Callable[[list[int]], str]) -> tuple[list[str], list[list[int]]]:
    """Group tokens into the shortest runs that decode to whole characters (Whisper's tokenizer method).

    Tokens left at the end that never complete a character (a sequence cut at the token limit mid-letter)
    form a last group, so that the groups always decode, together, to ``decode(tokens)``.
    """
    full = decode(list(tokens))
    words: list[str] = []
    groups: list[list[int]] = []
    current: list[int] = []
    offset = 0
    for t in tokens:
        current.append(t)
        decoded = decode(current)
        if _REPLACEMENT_CHAR not in decoded or full[offset + decoded.index(_REPLACEMENT_CHAR):][:1] == _REPLACEMENT_CHAR:
            words.append(decoded)
            groups.append(current)
            current = []
            offset += len(decoded)
    if current:
        words.append(decode(current))
        groups.append(current)
    return words, groups


def split_to_word_tokens(tokens: Sequence[int], decode: Callable[[list[int]], str], eot: int,
                         language: str | None) -> tuple[list[str], list[list[int]]]:
    """Whisper's word split: a new word starts at a special token, a subword with a leading space, or a
    punctuation mark; languages written without spaces split at each character."""
    subwords, groups = split_tokens_on_unicode(tokens, decode)
    if language in NO_SPACE_LANGUAGES:
        return subwords, groups
    words: list[str] = []
    word_tokens: list[list[int]] = []
    for subword, group in zip(subwords, groups):
        special = group[0] >= eot
        if special or subword.startswith(" ") or subword.strip() in string.punctuation or not words:
            words.append(subword)
            word_tokens.append(list(group))
        else:
            words[-1] += subword
            word_tokens[-1].extend(group)
    return words, word_tokens


@dataclass
class _Timing:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def merge_punctuations(alignment: list[_Timing], prepended: str = PREPEND_PUNCTUATIONS,
                       appended: str = APPEND_PUNCTUATIONS) -> None:
    """Attach opening punctuation to the word after it and closing punctuation to the word before it, in
    place (Whisper's ``merge_punctuations``); a merged mark leaves an empty word behind."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def words_from_alignment(text_tokens: Sequence[int], text_indices: np.ndarray, time_indices: np.ndarray,
                         token_probs: Sequence[float], decode: Callable[[list[int]], str], eot: int,
                         language: str | None, duration_s: float) -> list[Word]:
    """The words of one segment from its DTW path.

    ``text_indices``/``time_indices``: the path over the rows of ``text_tokens + [eot]`` and the encoder frames
    (both ascending, every row visited); ``token_probs``: one per text token; ``duration_s``: the segment's
    audio. Words come back in order, inside ``[0, duration_s]``, each starting where the one before ended or
    later; empty words (special tokens, merged punctuation) are left out.
    """
    tokens = [int(t) for t in text_tokens]
    if not tokens:
        return []
    words, word_tokens = split_to_word_tokens(tokens + [eot], decode, eot, language)
    if len(word_tokens) <= 1:
        return []
    text_indices = np.asarray(text_indices)
    time_indices = np.asarray(time_indices)
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / FRAMES_PER_S
    if len(jump_times) < len(tokens) + 1:  # a path that skips rows: no usable timing
        return []
    probs = np.asarray(token_probs, dtype=np.float64)
    alignment = [
        _Timing(w, t, float(jump_times[i]), float(jump_times[j]), float(np.mean(probs[i:j])) if j > i else 0.0)
        for w, t, i, j in zip(words[:-1], word_tokens[:-1], boundaries[:-1], boundaries[1:])]
    _truncate_long_words(alignment)
    merge_punctuations(alignment)
    out: list[Word] = []
    end_prev = 0.0
    for a in alignment:
        if not a.word:
            continue
        start = min(max(a.start, end_prev), duration_s)
        end = min(max(a.end, start), duration_s)
        out.append(Word(a.word, start, end, a.probability))
        end_prev = end
    return out


def median_filter(x, width: int = MEDIAN_FILTER_WIDTH):
    """The median of each ``width`` neighbours along the last axis of a torch tensor, its edges reflected:
    transformers' ``_median_filter`` (which sorts every window), as an odd-even transposition network of
    element-wise minima and maxima: the same values, 4 to 5 times faster on a CPU."""
    import torch
    import torch.nn.functional as F

    pad = width // 2
    n = x.shape[-1]
    if width <= 1 or n <= pad:
        return x
    p = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    lanes = [p[..., k:k + n] for k in range(width)]
    for r in range(width):
        for i in range(r % 2, width - 1, 2):
            a, b = lanes[i], lanes[i + 1]
            lanes[i], lanes[i + 1] = torch.minimum(a, b), torch.maximum(a, b)
    return lanes[pad]


def dynamic_time_warping(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``matrix`` (tokens x frames) as ``(text_indices, time_indices)``:
    openai/whisper's ``dtw_cpu`` and transformers' ``_dynamic_time_warping`` (the same float32 costs, the
    same tie rule, the same path), with each anti-diagonal of the cost table computed at once (its cells
    depend only on the two diagonals before it) instead of one cell a Python iteration: about 1,500 numpy
    steps for a 30 s window instead of 200,000 Python ones."""
    n, m = matrix.shape
    # skewed tables: row d holds the cells (i, j) with i + j = d, at column i
    cost = np.full((n + m + 1, n + 1), np.inf, dtype=np.float32)
    trace = np.full((n + m + 1, n + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    ii, jj = np.meshgrid(np.arange(1, n + 1), np.arange(1, m + 1), indexing="ij")
    skewed = np.zeros((n + m + 1, n + 1), dtype=np.float64)
    skewed[ii + jj, ii] = matrix
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1)
        if lo > hi:
            continue
        c0 = cost[d - 2, lo - 1:hi]  # (i-1, j-1)
        c1 = cost[d - 1, lo - 1:hi]  # (i-1, j)
        c2 = cost[d - 1, lo:hi + 1]  # (i, j-1)
        first = (c0 < c1) & (c0 < c2)
        second = ~first & (c1 < c0) & (c1 < c2)
        t = np.where(first, 0, np.where(second, 1, 2)).astype(np.int8)
        c = np.where(first, c0, np.where(second, c1, c2))
        cost[d, lo:hi + 1] = skewed[d, lo:hi + 1] + c
        trace[d, lo:hi + 1] = t
    i, j = n, m
    text, time = [], []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        t = 2 if i == 0 else 1 if j == 0 else trace[i + j, i]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    return np.array(text[::-1]), np.array(time[::-1])


def words_from_weights(weights, start: int, text_tokens: Sequence[int], token_probs: Sequence[float],
                       decode: Callable[[list[int]], str], eot: int, language: str | None,
                       duration_s: float) -> list[Word]:
    """The words of one segment from its alignment heads' cross-attention weights (torch, heads x rows x
    frames: the rows of ``prompt + text + [eot]``, the prompt ``start`` tokens long, the frames of the
    segment's audio only): normalised per head over the rows, median-filtered, averaged over the heads, the
    rows that predict each text token and end-of-text through dynamic time warping, then
    :func:`words_from_alignment`. openai/whisper's ``find_alignment``, as transformers computes it
    (:func:`median_filter`, :func:`dynamic_time_warping`: its results, faster)."""
    import torch

    end = start + len(text_tokens)
    w = weights[:, :end + 1].float()
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = median_filter((w - mean) / std, MEDIAN_FILTER_WIDTH)
    matrix = w.mean(dim=0)[start - 1:end]  # the rows that predict each text token and end-of-text
    text_idx, time_idx = dynamic_time_warping(-matrix.double().cpu().numpy())
    return words_from_alignment(text_tokens, np.asarray(text_idx), np.asarray(time_idx), token_probs, decode, eot,
                                language, duration_s)


def _truncate_long_words(alignment: list[_Timing]) -> None:
    """Whisper's fix for a word stretched over a pause at a sentence boundary: a word longer than twice the
    median word (at most 1.4 s) next to a sentence-ending mark is cut to that length, on the pause's side."""
    durations = np.array([a.end - a.start for a in alignment])
    durations = durations[durations.nonzero()]
    if not len(durations):
        return
    max_duration = 2 * min(0.7, float(np.median(durations)))
    for i in range(1, len(alignment)):
        a = alignment[i]
        if a.end - a.start > max_duration:
            if a.word in SENTENCE_END_MARKS:
                a.end = a.start + max_duration
            elif alignment[i - 1].word in SENTENCE_END_MARKS:
                a.start = a.end - max_duration


def fit_to_speech(times: Sequence[tuple[float, float]],
                  speech: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Word times trimmed to the detected speech: a word that starts in a pause and reaches the speech after
    it starts where that speech starts; a word that ends in (or past) the pause after the speech it starts in
    ends where that speech ends.

    Why: the alignment places a word's edges only as finely as the attention separates them, and a word next
    to a pause takes part of the pause (on the corpus, sentences' first words started 0.2 s early). The VAD
    says where the speech is (Silero's spans, 30 ms of padding included); no word is spoken in a pause. A word
    that lies wholly in a pause (speech the VAD missed) keeps its times. ``times`` and ``speech`` are in one
    timeline, ``speech`` sorted and non-overlapping; every word stays within its own times, so words stay in
    order, non-overlapping and inside their segment.
    """
    out = []
    ends = [b for _, b in speech]
    for s, e in times:
        k = int(np.searchsorted(ends, s, side="right"))  # the first span that ends after the word starts
        if k < len(speech):
            a, b = speech[k]
            if s < a < e:
                s = a
            if a <= s and e > b:
                e = max(s, b)
        out.append((s, e))
    return out
