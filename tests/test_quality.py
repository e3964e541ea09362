"""The hallucination-like segment checks of krasr_batch.quality, one rule at a time, on crafted text."""

from __future__ import annotations

import zlib

import pytest

from krasr_batch import quality
from krasr_batch.quality import compression_ratio, has_ngram_loop, suspect, suspect_reasons, too_long_for_duration

NORMAL_KK = "Сәлеметсіз бе, бүгін біз Қазақстанның тарихы туралы сөйлесеміз. Бұл өте маңызды тақырып."
NORMAL_RU = "Добрый день, сегодня мы поговорим о развитии экономики региона и о задачах на ближайшие годы."


def test_compression_ratio_is_whispers():
    text = "бір екі үш " * 3
    b = text.encode("utf-8")
    assert compression_ratio(text) == len(b) / len(zlib.compress(b))
    assert compression_ratio(NORMAL_KK) < 2.4
    assert compression_ratio(NORMAL_RU) < 2.4
    assert compression_ratio("спасибо за внимание " * 6) > 2.4


@pytest.mark.parametrize("text", [
    "да да да да",  # one word, 4 times
    "мен сені мен сені мен сені мен сені",  # a bigram
    "бұл өте жақсы бұл өте жақсы бұл өте жақсы бұл өте жақсы",  # a trigram
    "a b c d a b c d a b c d a b c d",  # a 4-gram
    "Ол айтты: рахмет, рахмет. Рахмет! Рахмет? және кетті",  # case and punctuation do not hide a loop
    "хахахахахахахахахахаха",  # a character loop, no spaces
    "ооооооооооооооооооооо",
])
def test_ngram_loops(text):
    assert has_ngram_loop(text)
    assert "ngram_loop" in suspect_reasons(text, 30.0)


@pytest.mark.parametrize("text", [
    "", None, "да да да", NORMAL_KK, NORMAL_RU,
    "бір екі бір екі бір екі",  # a bigram three times
    "ааааааа",  # a short character run
])
def test_no_ngram_loop(text):
    assert not has_ngram_loop(text)


def test_ngram_loop_parameters():
    assert has_ngram_loop("бір екі бір екі бір екі", min_repeats=3)
    assert not has_ngram_loop("a b c d e a b c d e a b c d e a b c d e", max_n=4, min_char_span=1000)


def test_too_long_for_duration():
    assert not too_long_for_duration("x" * 70, 2.0)  # 25 chars/s * 2 s + 20 slack = 70
    assert too_long_for_duration("x" * 71, 2.0)
    assert too_long_for_duration("бір екі үш төрт бес алты жеті", 0.0)
    assert not too_long_for_duration("x" * 500, None)
    assert not too_long_for_duration("x" * 500, float("nan"))
    assert suspect_reasons(NORMAL_RU, 1.0) == ["too_long"]
    assert suspect_reasons(NORMAL_RU, 6.0) == []


def test_compression_ratio_rule_alone():
    # varied words (no back-to-back loop) that still compress far too well
    text = " ".join(f"{w} сөз тіркесі мен сөйлем" for w in ["бірінші", "екінші", "үшінші", "төртінші", "бесінші"] * 3)
    assert not has_ngram_loop(text)
    assert compression_ratio(text) > quality.COMPRESSION_RATIO_THRESHOLD
    assert suspect_reasons(text, 60.0) == ["compression_ratio"]


def test_avg_logprob_rule():
    assert suspect_reasons(NORMAL_KK, 10.0, avg_logprob=-1.2) == ["avg_logprob"]
    assert suspect_reasons(NORMAL_KK, 10.0, avg_logprob=-1.0) == []  # whisper: strictly below -1.0
    assert suspect_reasons(NORMAL_KK, 10.0, avg_logprob=-0.3) == []
    assert suspect_reasons(NORMAL_KK, 10.0, avg_logprob=float("nan")) == []


def test_no_speech_rule():
    assert suspect_reasons(NORMAL_KK, 10.0, no_speech_prob=0.9) == ["no_speech"]  # logprob unknown
    assert suspect_reasons(NORMAL_KK, 10.0, avg_logprob=-0.2, no_speech_prob=0.9) == []  # model was sure
    assert suspect_reasons(NORMAL_KK, 10.0, avg_logprob=-1.5, no_speech_prob=0.9) == ["avg_logprob", "no_speech"]
    assert suspect_reasons(NORMAL_KK, 10.0, no_speech_prob=0.5) == []


def test_suspect_combines_rules_and_ignores_empty_text():
    assert not suspect(NORMAL_KK, 10.0, avg_logprob=-0.2, no_speech_prob=0.01)
    assert suspect("да да да да", 10.0)
    assert suspect(NORMAL_KK, 10.0, avg_logprob=-2.0)
    assert not suspect("", 0.0, avg_logprob=-5.0, no_speech_prob=1.0)
    assert not suspect("   ", 1.0)
    many = suspect_reasons("рахмет " * 40, 1.0, avg_logprob=-3.0)
    assert many == ["ngram_loop", "compression_ratio", "avg_logprob", "too_long"]


def test_truncation_cause_tells_a_loop_from_text_that_did_not_fit():
    from krasr_batch.quality import truncation_cause

    assert truncation_cause("Мы купили свежий хлеб", False) is None
    assert truncation_cause("Мы купили свежий хлеб, молоко и немного сыра, а потом пошли", True) == "did_not_fit"
    assert truncation_cause("және және және және және және", True) == "repetition"
    assert truncation_cause("ааааааааааааааааааааааааа", True) == "repetition"
    assert truncation_cause("", True) == "did_not_fit"  # nothing decoded before the limit: not a loop
