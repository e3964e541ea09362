from pathlib import Path

import numpy as np
import pytest

from krasr_batch.decode import MODEL_MAX_NEW_TOKENS, SegmentInput, WhisperDecoder, language_code, max_new_tokens_for
from krasr_batch.settings import DecodeOptions, build_settings, load_preset


@pytest.mark.parametrize("duration, limit", [
    (0.0, 40), (0.1, 40), (5.0, 40), (5.001, 64), (10.0, 64), (10.01, 80), (15.0, 80), (15.5, 96),
    (20.0, 96), (20.2, 112), (25.0, 112), (25.01, 128), (30.0, 128), (600.0, 128), (None, 96), (float("nan"), 96),
])
def test_card_token_limit_table(duration, limit):
    assert max_new_tokens_for(duration) == limit


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


def test_decoder_groups_by_limit_and_language(tiny_model):
    dec = WhisperDecoder(DecodeOptions(model=str(tiny_model), batch_size=2), device="cpu")
    rng = np.random.default_rng(0)
    inputs = [SegmentInput(rng.normal(0, 0.1, 16000 * d).astype(np.float32), lang, max_new_tokens_for(d))
              for d, lang in [(3, "kazakh"), (12, "russian"), (3, "kazakh"), (3, "russian"), (3, "kazakh")]]
    out = dec.decode(inputs)
    assert len(out) == 5
    # kazakh/40 has three segments: one batch of 2 and one of 1; the others are alone in their group
    assert [o.batch_size for o in out] == [2, 1, 2, 1, 1]
    assert [o.language for o in out] == ["kk", "ru", "kk", "ru", "kk"]
    for o, x in zip(out, inputs):
        assert 0 <= o.num_tokens <= x.max_new_tokens
        assert o.truncated == (o.num_tokens >= x.max_new_tokens)
        assert o.avg_logprob is not None and o.avg_logprob <= 0 and 0 <= o.no_speech_prob <= 1
    assert dec.limit_for(3.0) == 40
    no_limit = WhisperDecoder(DecodeOptions(model=str(tiny_model), token_limit=False), device="cpu")
    assert no_limit.limit_for(3.0) == MODEL_MAX_NEW_TOKENS


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
        assert settings.decode.engine == "ctranslate2" and settings.resources.device == "cpu"
