from pathlib import Path

import numpy as np
import pytest

from krasr_batch.audio import load_audio
from krasr_batch.engines import (
    FIT_TOKENS_PER_S,
    MODEL_MAX_NEW_TOKENS,
    SegmentInput,
    language_code,
    max_new_tokens_for,
    segment_token_limit,
)
from krasr_batch.engines.transformers import WhisperDecoder
from krasr_batch.quality import truncation_cause
from krasr_batch.settings import DecodeOptions, build_settings, load_preset

from .conftest import free_port, read_jsonl


@pytest.mark.parametrize("duration, limit", [
    (0.0, 40), (0.1, 40), (5.0, 40), (5.001, 64), (10.0, 64), (10.01, 80), (15.0, 80), (15.5, 96),
    (20.0, 96), (20.2, 112), (25.0, 112), (25.01, 128), (30.0, 128), (600.0, 128), (None, 96), (float("nan"), 96),
])
def test_card_token_limit_table(duration, limit):
    assert max_new_tokens_for(duration) == limit


@pytest.mark.parametrize("duration", [0.5, 3.0, 5.0, 7.5, 12.0, 18.0, 24.0, 29.9, 30.0, 45.0])
def test_a_file_decoded_whole_keeps_the_cards_limit_under_every_policy_but_none(duration):
    for policy in ("fit", "card"):
        assert segment_token_limit(duration, True, policy) == max_new_tokens_for(duration)
    assert segment_token_limit(duration, True, "none") == MODEL_MAX_NEW_TOKENS


@pytest.mark.parametrize("duration", [0.5, 3.0, 5.0, 7.5, 12.0, 18.0, 24.0, 29.9, 30.0])
def test_a_window_of_a_longer_recording_gets_the_per_second_budget(duration):
    fit = segment_token_limit(duration, False, "fit")
    assert fit >= max_new_tokens_for(duration)  # never below the card
    assert fit >= FIT_TOKENS_PER_S * duration  # room for the densest speech measured
    assert fit <= MODEL_MAX_NEW_TOKENS
    assert segment_token_limit(duration, False, "card") == max_new_tokens_for(duration)


def test_the_per_second_budget_grows_past_the_cards_table_on_long_windows():
    assert segment_token_limit(30.0, False, "fit") == 360 > max_new_tokens_for(30.0) == 128
    assert segment_token_limit(3.0, False, "fit") == 60  # 12 tokens a second over the card's 5 s bucket


def test_the_budget_takes_six_values_like_the_cards_table_so_segments_still_batch():
    limits = {segment_token_limit(d / 10, False, "fit") for d in range(1, 301)}
    assert limits == {60, 120, 180, 240, 300, 360}


def test_token_limit_policy_settings():
    assert DecodeOptions().token_limit == "fit"
    assert DecodeOptions(token_limit=True).token_limit == "card"  # presets written before the policies
    assert DecodeOptions(token_limit=False).token_limit == "none"
    with pytest.raises(ValueError, match="token_limit"):
        DecodeOptions(token_limit="sometimes")
    with pytest.raises(ValueError, match="policy"):
        segment_token_limit(10.0, False, "sometimes")


def test_card_policy_keeps_the_fingerprint_of_runs_made_before_the_policies():
    from krasr_batch.settings import RunSettings

    old_style = RunSettings(decode=DecodeOptions(token_limit=True, engine="transformers"))
    card = RunSettings(decode=DecodeOptions(token_limit="card", engine="transformers"))
    assert old_style.output_fingerprint() == card.output_fingerprint()
    assert RunSettings().with_engine("transformers").output_fingerprint() != old_style.output_fingerprint()


def test_the_card_preset_keeps_its_fingerprint_and_raising_quiet_files_is_part_of_the_default():
    """jobs/card.yaml (max_gain_db 0: the audio as it is) fingerprints as it did before quiet files were
    raised (89240b6d42cfa040, computed at commit a74937f), so its earlier outputs resume; the default, which
    raises them, is another output."""
    from krasr_batch.settings import RunSettings

    card = load_preset(str(Path(__file__).parent.parent / "jobs" / "card.yaml"))
    card.pop("manifest", None)
    card.pop("out", None)
    assert build_settings(card).output_fingerprint() == "89240b6d42cfa040"
    raised = build_settings(dict(card, max_gain_db=50))
    assert raised.output_fingerprint() != "89240b6d42cfa040"
    assert RunSettings().segment.max_gain_db == 50.0 and build_settings(card).segment.max_gain_db == 0.0


def test_language_codes():
    assert language_code("kazakh") == "kk"
    assert language_code("Russian") == "ru"
    assert language_code("kk") == "kk"
    assert language_code(None) == ""


def test_options_are_checked():
    with pytest.raises(ValueError, match="beams"):
        DecodeOptions(beams=0)
    with pytest.raises(ValueError, match="task"):
        DecodeOptions(task="summarize")


def test_decoder_groups_by_limit_and_shares_batches_across_languages(tiny_model):
    # the card's limits: random weights run every clip to its limit, which "fit" would take on to the budget
    dec = WhisperDecoder(DecodeOptions(model=str(tiny_model), batch_size=2, token_limit="card"), device="cpu")
    rng = np.random.default_rng(0)
    inputs = [SegmentInput(rng.normal(0, 0.1, 16000 * d).astype(np.float32), lang, max_new_tokens_for(d))
              for d, lang in [(3, "kazakh"), (12, "russian"), (3, "kazakh"), (3, "russian"), (3, "kazakh")]]
    out = dec.decode(inputs)
    assert len(out) == 5
    # limit 40 has four segments of two languages (one prompt per row): two batches of 2; 64 is alone
    assert [o.batch_size for o in out] == [2, 1, 2, 2, 2]
    assert [o.language for o in out] == ["kk", "ru", "kk", "ru", "kk"]
    for o, x in zip(out, inputs):
        assert 0 <= o.num_tokens <= x.max_new_tokens
        assert o.truncated == (o.num_tokens >= x.max_new_tokens)
        assert o.avg_logprob is not None and o.avg_logprob <= 0 and 0 <= o.no_speech_prob <= 1


def test_a_row_of_a_mixed_language_batch_decodes_as_in_a_batch_of_its_own_language(tiny_model):
    rng = np.random.default_rng(5)
    audios = [rng.normal(0, 0.1, 16000 * 3).astype(np.float32) for _ in range(4)]
    langs = ["kazakh", "russian", "kazakh", "russian"]
    # the card's limits (as in the tests below): "fit" decodes again a clip that random weights run to its limit
    mixed = WhisperDecoder(DecodeOptions(model=str(tiny_model), batch_size=4, token_limit="card"), device="cpu")
    out = mixed.decode([SegmentInput(a, x, 12) for a, x in zip(audios, langs)])
    assert [o.batch_size for o in out] == [4] * 4 and [o.language for o in out] == ["kk", "ru", "kk", "ru"]
    pairs = WhisperDecoder(DecodeOptions(model=str(tiny_model), batch_size=2), device="cpu")
    for lang in ("kazakh", "russian"):
        idx = [i for i, x in enumerate(langs) if x == lang]
        alone = pairs._generate([audios[i] for i in idx], lang, 12)
        assert [o.text for o in alone] == [out[i].text for i in idx]
        assert [o.num_tokens for o in alone] == [out[i].num_tokens for i in idx]


def _joined_clips(corpus: Path) -> list[tuple[np.ndarray, str]]:
    """Clips as an archive holds them, from the corpus's sentences (0.1 s apart): three Kazakh sentences in
    about 11.6 s, two in about 8.6 s, and one Russian sentence."""
    rows = read_jsonl(corpus / "clips.jsonl")
    kk, ru = [c for c in rows if c["category"] == "kk"], [c for c in rows if c["category"] == "ru"]
    gap = np.zeros(1600, np.float32)
    clips = []
    for group in (kk[0:3], kk[9:11], ru[0:1]):
        audio = [part for c in group for part in (load_audio(str(corpus / c["path"])), gap)][:-1]
        clips.append((np.concatenate(audio), " ".join(c["text"] for c in group)))
    return clips


def _same(a, b) -> bool:
    """Two results of one segment equal but for the model call's wall time."""
    return a.text == b.text and a.num_tokens == b.num_tokens and a.truncated == b.truncated \
        and a.max_new_tokens == b.max_new_tokens and a.avg_logprob == b.avg_logprob


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "ctranslate2", "transformers"])
def test_a_clip_its_card_limit_cuts_short_goes_on_to_the_fit_budget(base_model, corpus, engine):
    """A file decoded whole keeps the card's call, and its text where the card's limit does not cut it; where
    it cuts real text (not a loop), the clip goes on to the budget a window of its length gets. The torch and
    CTranslate2 engines continue the cut text (the card's text, then more); transformers' decodes the clip again
    and keeps the longer of the two texts."""
    from transformers import WhisperTokenizer

    from krasr_batch.engines import load_decoder

    clips = _joined_clips(corpus)
    inputs = [SegmentInput(a, "kazakh", max_new_tokens_for(len(a) / 16000)) for a, _ in clips]
    tok = WhisperTokenizer.from_pretrained(str(base_model))
    need = len(tok(" " + clips[0][1], add_special_tokens=False).input_ids) + 1  # its words and end-of-text
    assert inputs[0].max_new_tokens == 80 < need  # a perfect transcript of 11.6 s of Kazakh does not fit the card's 80

    dec = load_decoder(DecodeOptions(model=str(base_model), engine=engine, batch_size=4), device="cpu")
    assert dec.options.token_limit == "fit"  # the default
    assert dec.continues_cut_clips == (engine != "transformers")
    card_policy = load_decoder(DecodeOptions(model=str(base_model), engine=engine, batch_size=4, token_limit="card"),
                               device="cpu")
    card = card_policy.decode(inputs)  # the card's call, as --token-limit card makes it
    cut = [i for i, r in enumerate(card) if truncation_cause(r.text, r.truncated) == "did_not_fit"]
    assert 0 in cut and all(r.max_new_tokens is None for r in card)
    budget = {i: segment_token_limit(len(inputs[i].audio) / 16000, False, "fit") for i in cut}
    out = dec.decode(inputs)
    if not dec.continues_cut_clips:
        again = dict(zip(cut, dec._decode_batches([SegmentInput(inputs[i].audio, "kazakh", budget[i], False)
                                                   for i in cut])))
    for i, (c, o) in enumerate(zip(card, out)):
        if i not in cut:
            assert _same(o, c) and o.max_new_tokens is None  # the card's text, untouched
        elif dec.continues_cut_clips:  # the card's words (its last one may be split by the cut), then more
            assert o.max_new_tokens == budget[i] and o.num_tokens > c.num_tokens
            assert o.text.startswith(c.text.rsplit(" ", 1)[0]) and len(o.text) > len(c.text)
        elif again[i].num_tokens >= c.num_tokens:
            assert o.text == again[i].text and o.max_new_tokens == budget[i] and o.truncated == again[i].truncated
        else:  # with room a shorter hypothesis ended by itself: the cut text holds more words, and stays flagged
            assert _same(o, c) and o.truncated
    assert out[0].max_new_tokens == 180 and out[0].num_tokens > 80  # the 11.6 s clip: past the card's limit
    assert 2 not in cut and not out[2].truncated  # the Russian sentence ends by itself


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "ctranslate2"])
def test_with_one_beam_a_continued_clip_reads_as_a_decode_at_its_budget(base_model, corpus, engine):
    """Continuing the cut text is the same search, not a new one: with one beam (greedy, the card's penalties
    and n-gram ban over the whole text), a clip cut at its card limit and continued reads token for token as
    the clip decoded at its budget at once, with the same log-probability."""
    from krasr_batch.engines import load_decoder

    inputs = [SegmentInput(a, "kazakh", max_new_tokens_for(len(a) / 16000)) for a, _ in _joined_clips(corpus)]
    dec = load_decoder(DecodeOptions(model=str(base_model), engine=engine, batch_size=4, beams=1,
                                     dtype="float32"), device="cpu")
    out = dec.decode(inputs)
    went_on = [i for i, r in enumerate(out) if r.max_new_tokens is not None]
    assert 0 in went_on
    once = dec._decode_batches([SegmentInput(inputs[i].audio, "kazakh", out[i].max_new_tokens, False)
                                for i in went_on])
    for i, r in zip(went_on, once):
        assert (out[i].text, out[i].num_tokens, out[i].truncated) == (r.text, r.num_tokens, r.truncated)
        assert out[i].num_tokens > inputs[i].max_new_tokens
        assert out[i].avg_logprob == pytest.approx(r.avg_logprob, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "ctranslate2"])
def test_a_clip_cut_where_its_text_ends_goes_on_to_end_of_text(base_model, corpus, engine):
    """A clip whose limit is exactly its text's length stops there without end-of-text, cut. Going on, its
    first step is not the text's first: end-of-text (and the blank) may come at once, as in a decode at the
    budget, so the clip ends there with the same text and nothing made up after it."""
    from krasr_batch.engines import load_decoder

    audio = _joined_clips(corpus)[2][0]  # the Russian sentence, which ends by itself
    dec = load_decoder(DecodeOptions(model=str(base_model), engine=engine, batch_size=4, beams=1,
                                     dtype="float32"), device="cpu")
    free = dec._decode_batches([SegmentInput(audio, "russian", 180, False)])[0]
    assert not free.truncated and free.num_tokens > 5
    cut = SegmentInput(audio, "russian", free.num_tokens, exact_limit=True)  # no step left for end-of-text
    card = load_decoder(DecodeOptions(model=str(base_model), engine=engine, batch_size=4, beams=1, dtype="float32",
                                      token_limit="card"), device="cpu").decode([cut])[0]
    assert card.truncated and card.text == free.text and card.max_new_tokens is None
    out = dec.decode([cut])[0]
    assert (out.text, out.num_tokens, out.truncated) == (free.text, free.num_tokens, False)
    assert out.max_new_tokens == segment_token_limit(len(audio) / 16000, False, "fit")
    assert out.avg_logprob == pytest.approx(free.avg_logprob, abs=1e-3)


@pytest.mark.slow
def test_each_torch_search_continues_a_cut_clip_alike(base_model, corpus):
    """The GPU's searches (device, graphed: the CPU runs them too) continue a clip from its cut text as the host
    search does: the continuation's prompt holds the card's tokens, longer than any prompt they see otherwise."""
    from krasr_batch.engines import load_decoder

    inputs = [SegmentInput(a, "kazakh", max_new_tokens_for(len(a) / 16000)) for a, _ in _joined_clips(corpus)]
    dec = load_decoder(DecodeOptions(model=str(base_model), engine="torch", dtype="float32", batch_size=4), "cpu")
    want = dec.decode(inputs)
    assert want[0].max_new_tokens == 180 and want[0].num_tokens > inputs[0].max_new_tokens
    for search in ("device", "graphed"):
        dec.search = search
        got = dec.decode(inputs)
        assert [(o.text, o.num_tokens, o.truncated, o.max_new_tokens) for o in got] == \
            [(o.text, o.num_tokens, o.truncated, o.max_new_tokens) for o in want], search
        assert [o.avg_logprob for o in got] == pytest.approx([o.avg_logprob for o in want], abs=1e-4)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load the model"):
        WhisperDecoder(DecodeOptions(model=str(tmp_path / "nope")), device="cpu")


@pytest.mark.parametrize("preset", sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_job_preset_builds_settings(preset):
    options = load_preset(preset)
    options.pop("manifest", None)
    options.pop("out", None)
    settings = build_settings(options)
    assert settings.decode.beams == 3 and settings.decode.repetition_penalty == 1.12
    if preset.name == "cpu.yaml":
        assert settings.decode.engine == "auto" and settings.resources.device == "cpu"


def test_a_preset_value_of_the_wrong_type_names_the_file_and_the_option(tmp_path):
    """Before: 'beams: three' ended the command with "'<' not supported between instances of 'str' and
    'int'", naming neither the preset nor the option."""
    bad = tmp_path / "j.yaml"
    for text, words in [("beams: three", "beams: expected a whole number, got 'three'"),
                        ("flush_s: yes", "flush_s: expected a number, got True"),
                        ("language: 5", "language: expected text, got 5")]:
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=f"job preset {bad}: {words}"):
            load_preset(bad)
    bad.write_text("languages: [kk, ru]\nactors: null\ntoken_limit: true\nmax_segment_s: 20\n")
    settings = build_settings(load_preset(bad))  # null is the default; true is the card's limit (older presets)
    assert (settings.decode.languages, settings.decode.token_limit, settings.segment.max_segment_s) == (
        ("kk", "ru"), "card", 20)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_our_ngram_ban_bans_exactly_what_transformers_bans(n):
    import torch
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    from krasr_batch.engines.transformers import NoRepeatNGramBan

    gen = torch.Generator().manual_seed(n)
    for length in (1, n - 1, n, n + 1, 12, 40):
        ids = torch.randint(0, 6, (9, length), generator=gen)  # a small vocabulary, so n-grams repeat often
        scores = torch.randn(9, 50, generator=gen)
        expected = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
        assert torch.equal(NoRepeatNGramBan(n)(ids, scores.clone()), expected)


def test_the_transformers_engine_with_our_ban_gives_transformers_own_output(tiny_model):
    import torch

    dec = WhisperDecoder(DecodeOptions(model=str(tiny_model), token_limit="card"), device="cpu")
    audio = np.random.default_rng(3).normal(0, 0.1, 16000 * 6).astype(np.float32)
    feats = dec._features([audio], "pt")["input_features"]
    common = dict(task="transcribe", language="kazakh", num_beams=3, repetition_penalty=1.12, max_new_tokens=64)
    with torch.inference_mode():
        theirs = dec.model.generate(feats, no_repeat_ngram_size=4, **common)
    ours = dec.decode([SegmentInput(audio, "kazakh", 64)])[0]
    assert ours.text == dec.tokenizer.decode(theirs[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("engine", ["transformers", "torch", "ctranslate2"])
def test_the_benchmarks_count_of_model_calls_is_the_engines_own(tiny_model, engine, monkeypatch):
    """benchmarks.gpu_check counts an engine's model calls and decoder steps from ``Decoder.batch_plan``, the
    plan ``decode`` itself follows: the count equals the calls a loaded engine makes, for each engine's rule
    (languages mixed or not, windows of several budgets in one batch or not)."""
    from benchmarks.gpu_check import generate_calls
    from krasr_batch.engines import load_decoder

    # the benchmarks' own --limits card: under "fit" decode() adds a second pass for clips their limit cut
    dec = load_decoder(DecodeOptions(model=str(tiny_model), batch_size=2, engine=engine, token_limit="card"),
                       device="cpu")
    calls = []
    real = dec._generate_batch
    monkeypatch.setattr(dec, "_generate_batch", lambda batch: calls.append(len(batch)) or real(batch))
    rng = np.random.default_rng(1)
    inputs = [SegmentInput(rng.normal(0, 0.1, 16000 * d).astype(np.float32), lang, limit, exact)
              for d, lang, limit, exact in [(3, "kazakh", 12, True), (12, "russian", 20, True),
                                             (3, "russian", 12, True), (20, "kazakh", 16, False),
                                             (25, "russian", 18, False), (3, None, 12, True)]]
    dec.decode(inputs)
    assert generate_calls(inputs, 2, engine)[0] == len(calls)
    assert sorted(len(b) for b in dec.batch_plan(inputs, 2)) == sorted(calls)


@pytest.mark.parametrize("engine", ["torch", "transformers"])
def test_a_hub_id_where_the_hub_cannot_be_reached_loads_from_the_cache_or_fails_at_once(tmp_path, tiny_model, engine):
    """A hub id with no network (the hub at a closed port here; HF_HUB_OFFLINE not set, as on a user's machine):
    the model comes from the hub's cache, or the run fails naming the model. Before, transformers' loading
    asked the hub for each file with five retries: a cached model took 210 s to load and an uncached one
    failed after 302 s, with nothing said in between and then a misleading cause (no preprocessor_config.json)."""
    import os
    import shutil
    import subprocess
    import sys

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    code = ("import sys; from krasr_batch.engines import check_model, load_decoder; "
            "from krasr_batch.settings import DecodeOptions\n"
            "for model in sys.argv[2:]:\n"
            "    o = DecodeOptions(model=model, engine=sys.argv[1])\n"
            "    try:\n"
            "        print(model, 'languages', len(check_model(o)), 'replica', load_decoder(o, 'cpu').engine, flush=True)\n"
            "    except RuntimeError as e:\n"
            "        print(model, 'error', e, flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code, engine, "org/tiny", "org/elsewhere"], env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    cached, missing = p.stdout.splitlines()
    assert cached == f"org/tiny languages 99 replica {engine}", p.stdout
    assert missing.startswith("org/elsewhere error cannot load the model 'org/elsewhere'") and "local folder" in missing
    assert "Retrying" not in p.stderr, p.stderr[-3000:]  # the hub was asked once, not file by file with retries
