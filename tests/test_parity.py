"""Parity with the model card's usage on the real whisper-base weights (slow: a few minutes on 2 CPUs)."""

import json

import jiwer
import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf
from transformers.pipelines.audio_utils import ffmpeg_read

from benchmarks.baselines import card_pipeline, card_usage
from krasr_batch.audio import load_audio
from krasr_batch.engines import max_new_tokens_for, segment_token_limit
from krasr_batch.output.reader import open_output
from krasr_batch.report import inspect_run
from krasr_batch.textnorm import normalize

from .conftest import read_jsonl, run_cli, write_manifest


def audio_info(path: str) -> tuple[int, int]:
    info = sf.info(path)
    return info.samplerate, info.channels

pytestmark = pytest.mark.e2e  # Ray runs in subprocesses


@pytest.mark.slow
def test_same_text_as_the_card_pipeline(tmp_path, corpus, base_model):
    # every other clip: 25, five of each format, rate and channel layout, each language (all 50 took 6.5 min)
    clips = read_jsonl(corpus / "clips.jsonl")[::2]
    manifest = write_manifest(tmp_path / "clips.jsonl", clips, base=corpus)
    # --engine transformers: the card's exact call (the default, auto, picks CTranslate2 int8 on a CPU)
    r = run_cli(["run", str(manifest), "--out", str(tmp_path / "out"), "--model", str(base_model), "--no-progress",
                 "--engine", "transformers"])
    assert r.returncode == 0, r.stderr[-3000:]
    ours = {f["file_id"]: f["text"] for f in pads.dataset(tmp_path / "out" / "files").to_table().to_pylist()}
    refs = [normalize(c["text"]) for c in clips]
    wer_ours = jiwer.wer(refs, [normalize(ours[c["id"]]) for c in clips])
    asr = card_pipeline(str(base_model))

    # 1. the card's call on the very samples krasr-batch decoded: the same text, clip for clip. A clip the
    #    card's limit cut short (real text, not a loop) was decoded again at the "fit" budget (README, Token
    #    limits); its row says so with that budget as max_new_tokens, and its text is the card's call made with it
    segs = {s["file_id"]: s for s in pads.dataset(tmp_path / "out" / "segments").to_table().to_pylist()}
    on_samples, card_limit, again = {}, {}, []
    for c in clips:
        audio = load_audio(str(corpus / c["path"]))
        card_limit[c["id"]] = max_new_tokens_for(len(audio) / 16000)
        limit = segs[c["id"]]["max_new_tokens"]
        if limit != card_limit[c["id"]]:
            assert limit == segment_token_limit(len(audio) / 16000, False, "fit")
            again.append(c["id"])
        on_samples[c["id"]] = asr({"raw": audio, "sampling_rate": 16000}, generate_kwargs=dict(
            task="transcribe", language=c["language"], num_beams=3, no_repeat_ngram_size=4, repetition_penalty=1.12,
            max_new_tokens=limit))["text"].strip()
    same = [c["id"] for c in clips if on_samples[c["id"]] == ours[c["id"]]]
    assert len(same) >= 0.9 * len(clips), [(on_samples[i], ours[i]) for i in ours if i not in same]
    assert abs(wer_ours - jiwer.wer(refs, [normalize(on_samples[c["id"]]) for c in clips])) <= 0.01
    assert all(segs[i]["num_tokens"] >= card_limit[i] for i in again)  # longer than the cut text, never shorter
    # the summary line and run.json count them (with whisper-base, 3 of these 25 clips)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["counts"]["clips_past_card_limit"] == len(again) > 0
    assert f"{len(again)} clip{'s' if len(again) > 1 else ''} that the card's limit cut short went on to the fit " \
        "budget; " in r.stdout
    assert inspect_run(open_output(str(tmp_path / "out"))).clips_past_card_limit == len(again)  # from the rows

    # 2. the card's call on the files (the pipeline decodes and resamples them with ffmpeg, krasr-batch with
    #    soundfile/PyAV and soxr): resampled clips may differ word for word, the error rate may not
    #    A file at 16 kHz in one channel is not resampled or mixed: the pipeline's ffmpeg gives the very samples
    #    krasr-batch decoded (checked here), so the card's call on them, made above, is its text on that file
    native = [c for c in clips if audio_info(str(corpus / c["path"])) == (16000, 1)]
    for c in native:
        path = str(corpus / c["path"])
        np.testing.assert_array_equal(ffmpeg_read(open(path, "rb").read(), 16000), load_audio(path))
    others = [c for c in clips if c not in native]
    items = [{"id": c["id"], "path": str(corpus / c["path"]), "language": c["language"]} for c in others]
    card = {t.file_id: t.text for t in card_usage(items, str(base_model), asr=asr)[0]}
    card.update({c["id"]: on_samples[c["id"]] for c in native})
    wer_card = jiwer.wer(refs, [normalize(card[c["id"]]) for c in clips])
    # krasr-batch no worse than the card's file path. Two resamplers on near-random base-model text move the
    # WER both ways: with the corpus built by krasr_batch.testing (sox dither now repeatable, -R) krasr-batch
    # came out 0.011 better (0.945 against 0.956), which a two-sided bound called a failure
    assert wer_ours <= wer_card + 0.01, (wer_ours, wer_card)
    assert native and all(card[c["id"]] == ours[c["id"]] for c in native)  # no resampling: the very same text
