"""Word timestamps and languages (issue 14): tokens into words, word times from an alignment path, subtitle
cues, the settings, and both engines on real models (the text with and without word timing is the same)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from krasr_batch.audio import SAMPLE_RATE, load_audio
from krasr_batch.engines import SegmentInput, check_model, load_decoder
from krasr_batch.engines.timing import FRAMES_PER_S, fit_to_speech, split_to_word_tokens, words_from_alignment
from krasr_batch.export import MAX_CUE_LINES, MAX_CUE_S, MAX_LINE_CHARS, Word, word_cues
from krasr_batch.settings import DecodeOptions, RunSettings, SegmentOptions, build_settings, parse_languages
from tests.conftest import read_jsonl, run_cli

ENGINES = ["transformers", "ctranslate2", "torch"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import WhisperTokenizerFast

    return WhisperTokenizerFast.from_pretrained(tiny_model)


def _decode(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- tokens into words

@pytest.mark.parametrize("text", [
    " Сегодня хорошая погода, и мы идём гулять в парк.",
    " Бүгін ауа райы жақсы, біз саябаққа серуендеуге барамыз!",
    " Сен отчётты жібердің бе, или ещё нет? (Да) «ладно»",
])
def test_words_are_split_at_spaces_with_punctuation_attached(tokenizer, text):
    tokens = tokenizer.encode(text, add_special_tokens=False)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    words, groups = split_to_word_tokens(tokens + [eot], _decode(tokenizer), eot, "ru")
    assert words[-1] == "" and groups[-1] == [eot]  # end-of-text is a word of its own, as in Whisper
    assert "".join(words) == text and sum(groups, []) == tokens + [eot]
    # timed along a path that gives every token 5 frames, punctuation ends up inside its word
    n = len(tokens) + 1
    rows = np.repeat(np.arange(n), 5)
    timed = words_from_alignment(tokens, rows, np.arange(len(rows)), [0.5] * len(tokens), _decode(tokenizer), eot,
                                 "ru", 10.0)
    assert "".join(w.word for w in timed) == text
    assert [w.word.strip() for w in timed] == text.split()
    assert all(0.0 <= w.start_s <= w.end_s <= 10.0 for w in timed)
    assert all(a.end_s <= b.start_s for a, b in zip(timed, timed[1:]))


def test_word_times_follow_the_path(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = tokenizer.encode(" да нет", add_special_tokens=False)
    assert len(tokens) == 2
    # token 0 from frame 10, token 1 from frame 60, end-of-text from frame 100 (frames are 20 ms)
    rows = np.array([0] * 11 + [0] * 50 + [1] * 40 + [2] * 20)
    frames = np.concatenate([np.arange(11), np.arange(10, 60), np.arange(60, 100), np.arange(100, 120)])
    rows, frames = rows[10:], frames[10:]  # the path starts at frame 10 for token 0
    words = words_from_alignment(tokens, rows, frames, [0.9, 0.4], _decode(tokenizer), eot, "ru", 30.0)
    assert [(w.word, w.start_s, w.end_s, w.probability) for w in words] == [
        (" да", 10 / FRAMES_PER_S, 60 / FRAMES_PER_S, pytest.approx(0.9)),
        (" нет", 60 / FRAMES_PER_S, 100 / FRAMES_PER_S, pytest.approx(0.4))]
    # clamped to the segment's audio
    clamped = words_from_alignment(tokens, rows, frames, [0.9, 0.4], _decode(tokenizer), eot, "ru", 1.5)
    assert [(w.start_s, w.end_s) for w in clamped] == [(0.2, 1.2), (1.2, 1.5)]


def test_word_times_are_trimmed_to_the_detected_speech():
    speech = [(1.0, 2.0), (3.0, 4.0), (6.0, 7.0)]
    times = [
        (0.8, 1.5),  # starts in the pause before the speech it reaches: starts with it
        (1.5, 2.6),  # ends in the pause after its speech: ends with it
        (2.6, 3.4),  # both
        (3.4, 6.5),  # ends in the next speech, past the pause: ends where its own speech ends
        (6.5, 6.9),  # inside the speech: unchanged
        (7.2, 7.5),  # wholly in a pause (speech the VAD missed): unchanged
        (7.5, 7.5),
    ]
    got = fit_to_speech(times, speech)
    assert got == [(1.0, 1.5), (1.5, 2.0), (3.0, 3.4), (3.4, 4.0), (6.5, 6.9), (7.2, 7.5), (7.5, 7.5)]
    # every word stays within its own times, so order, non-overlap and the segment's bounds hold
    assert all(s0 <= s <= e <= e0 for (s0, e0), (s, e) in zip(times, got))
    assert fit_to_speech(times, []) == times


def test_stage_words_are_in_the_source_timeline_and_trimmed_to_its_speech():
    from krasr_batch.engines.timing import Word as TimedWord
    from krasr_batch.pipeline.stages import _source_words, source_time

    # a window of two stretches, 10-12 s and 20-21.5 s of the source; speech 10.4-11.6 and 20.5-21.3
    to_source = source_time(json.dumps([[10.0, 12.0], [20.0, 21.5]]), 10.0)
    words = [TimedWord(" а", 0.1, 1.0, 0.9), TimedWord(" б", 1.0, 2.3, 0.8), TimedWord(" в", 2.3, 3.5, 0.7)]
    got = _source_words(words, to_source, [[10.4, 11.6], [20.5, 21.3]])
    assert [(w["word"], w["start_s"], w["end_s"]) for w in got] == [
        (" а", 10.4, 11.0), (" б", 11.0, 11.6), (" в", pytest.approx(20.5), pytest.approx(21.3))]
    assert [w["end_s"] for w in _source_words(words, to_source, None)] == [11.0, 20.3, pytest.approx(21.5)]


def test_a_sequence_cut_mid_letter_still_joins_to_its_text(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = tokenizer.encode(" Өтінемін", add_special_tokens=False)
    # drop tokens from the end until the last one no longer completes a character
    cut = next((tokens[:k] for k in range(len(tokens) - 1, 0, -1)
                if "\ufffd" in _decode(tokenizer)(tokens[:k])), None)
    if cut is None:
        pytest.skip("this tokenizer has no multi-token letter in the word")
    words, _ = split_to_word_tokens(cut + [eot], _decode(tokenizer), eot, "kk")
    assert "".join(words) == _decode(tokenizer)(cut)


# ---------------------------------------------------------------- subtitle cues

def test_word_cues_respect_the_subtitle_limits():
    rng = np.random.default_rng(1)
    words, t = [], 0.0
    for i in range(400):
        length = int(rng.integers(1, 14))
        dur = float(rng.uniform(0.1, 0.9))
        gap = float(rng.choice([0.0, 0.0, 0.3, 2.5]))
        start = t + gap
        t = start + dur
        words.append(Word(" " + "ж" * length + ("," if i % 7 == 0 else ""), start, t))
    cues = word_cues(words)
    assert " ".join(line for _, _, lines in cues for line in lines) == " ".join(w.word.strip() for w in words)
    for start, end, lines in cues:
        assert 1 <= len(lines) <= MAX_CUE_LINES
        assert all(len(line) <= MAX_LINE_CHARS for line in lines)
        assert end - start <= MAX_CUE_S
    assert all(a[1] <= b[0] for a, b in zip(cues, cues[1:]))
    # one word longer than a line or a cue is alone in its cue, the only way past the limits
    assert word_cues([Word(" x" * 30, 0.0, 9.0), Word(" y", 9.0, 9.5)]) == [
        (0.0, 9.0, [("x " * 30).strip()]), (9.0, 9.5, ["y"])]


# ---------------------------------------------------------------- settings

def test_languages_option():
    assert parse_languages("kk,ru") == ("kk", "ru")
    assert parse_languages(["Russian", "kazakh", "ru"]) == ("kk", "ru")
    assert parse_languages("") == () and parse_languages(None) == ()
    with pytest.raises(ValueError, match="klingon"):
        DecodeOptions(languages="kk,klingon")
    assert build_settings({"languages": "ru, kk", "word_timestamps": True}).decode.languages == ("kk", "ru")


def test_word_timestamps_and_languages_change_the_fingerprint_and_only_when_set():
    base = RunSettings(decode=DecodeOptions(engine="transformers"))  # --engine auto is resolved before stamping
    words = RunSettings(decode=DecodeOptions(word_timestamps=True, engine="transformers"))
    langs = RunSettings(decode=DecodeOptions(language="auto", languages="kk,ru", engine="transformers"))
    auto = RunSettings(decode=DecodeOptions(language="auto", engine="transformers"))
    assert len({base.output_fingerprint(), words.output_fingerprint(), langs.output_fingerprint(),
                auto.output_fingerprint()}) == 4
    # runs made before these options keep their fingerprint (the stamp of the defaults is unchanged)
    assert base.output_fingerprint() == RunSettings(decode=DecodeOptions(
        word_timestamps=False, languages=(), engine="transformers")).output_fingerprint()
    d = dataclasses.asdict(base.decode)
    for k in ("batch_size", "engine", "word_timestamps", "languages"):
        d.pop(k)
    d["token_limit"] = "fit"
    payload = json.dumps({"decode": d, "segment": dataclasses.asdict(base.segment)}, sort_keys=True)
    assert base.output_fingerprint() == hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the engines on real models

def _clips(corpus: Path, n: int, category: str | None = None) -> list[np.ndarray]:
    rows = [r for r in read_jsonl(corpus / "clips.jsonl") if category is None or r["category"] == category]
    return [load_audio(str(corpus / r["path"])) for r in rows[:n]]


def _check_words(out, audios) -> None:
    for o, a in zip(out, audios):
        assert o.words is not None
        if not o.text:
            assert o.words == ()
            continue
        assert o.words, o.text
        assert "".join(w.word for w in o.words).strip() == o.text
        dur = len(a) / SAMPLE_RATE
        assert all(0.0 <= w.start_s <= w.end_s <= dur for w in o.words)
        assert all(a.end_s <= b.start_s for a, b in zip(o.words, o.words[1:]))
        assert all(0.0 <= w.probability <= 1.0 for w in o.words)


@pytest.mark.parametrize("engine", ENGINES)
def test_word_timing_never_changes_the_text(engine, tiny_model, corpus):
    audios = _clips(corpus, 4)
    rng = np.random.default_rng(0)
    audios.append(rng.normal(0, 0.1, SAMPLE_RATE * 12).astype(np.float32))  # noise: random text, cut at the limit
    for language in ("kazakh", None):
        inputs = [SegmentInput(a, language, 40) for a in audios]
        plain = load_decoder(DecodeOptions(model=str(tiny_model), engine=engine, batch_size=2), "cpu", 1).decode(inputs)
        timed = load_decoder(DecodeOptions(model=str(tiny_model), engine=engine, batch_size=2, word_timestamps=True),
                             "cpu", 1).decode(inputs)
        assert [o.text for o in timed] == [o.text for o in plain]
        assert [o.language for o in timed] == [o.language for o in plain]
        assert all(o.words is None for o in plain)
        _check_words(timed, audios)


@pytest.mark.parametrize("engine", ENGINES)
def test_languages_limit_detection(engine, tiny_model, corpus):
    audios = _clips(corpus, 6)
    inputs = [SegmentInput(a, None, 24) for a in audios]
    free = load_decoder(DecodeOptions(model=str(tiny_model), engine=engine, language="auto"), "cpu", 1).decode(inputs)
    limited = load_decoder(DecodeOptions(model=str(tiny_model), engine=engine, language="auto", languages="kk,ru"),
                           "cpu", 1).decode(inputs + [SegmentInput(audios[0], "tatar", 24)])
    assert {o.language for o in limited[:-1]} <= {"kk", "ru"}
    assert all(0.0 < o.language_prob <= 1.0 for o in free + limited)
    # a random model picks anything among 99 languages: some of it is neither Kazakh nor Russian
    assert {o.language for o in free} - {"kk", "ru"}
    assert limited[-1].language == "tt"  # a forced language is decoded as asked, also outside the list


def _without_alignment_heads(model: Path, to: Path) -> Path:
    to.mkdir()
    for f in model.iterdir():
        if f.name != "generation_config.json":
            (to / f.name).symlink_to(f)
    gc = json.loads((model / "generation_config.json").read_text())
    gc.pop("alignment_heads")
    (to / "generation_config.json").write_text(json.dumps(gc))
    return to


@pytest.mark.e2e
def test_a_model_without_alignment_heads_stops_before_any_work(tiny_model, corpus, tmp_path):
    """``krasr-batch run --word-timestamps`` (in its own process: Ray never starts in the test process) with a
    model whose generation config has no alignment heads: one error line, exit 2, nothing written."""
    model = _without_alignment_heads(tiny_model, tmp_path / "no-heads")
    check_model(DecodeOptions(model=str(model)))  # fine without word timestamps
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(corpus / "clips" / "ru_000.wav")}) + "\n")
    for engine in ENGINES:
        out = tmp_path / f"out-{engine}"
        r = run_cli(["run", str(manifest), "--out", str(out), "--model", str(model), "--engine", engine,
                     "--word-timestamps", "--num-cpus", "2", "--no-progress"], timeout=600)
        assert r.returncode == 2, (engine, r.stderr[-2000:])
        assert "alignment heads" in r.stderr and r.stderr.count("error:") == 1, r.stderr[-2000:]
        assert not (out / "files").exists() and not (out / "segments").exists()
    shutil.rmtree(model)


@pytest.mark.e2e
@pytest.mark.parametrize("engine", ENGINES)
def test_real_word_times_find_the_pause_between_two_sentences(engine, base_model, corpus):
    """whisper-base on two Russian clips joined by 2 s of silence: some word ends before the gap's middle and
    the next starts after it, each within 0.4 s of the gap's edge (speech ends and starts there)."""
    from krasr_batch.segment import analyse

    rows = [r for r in read_jsonl(corpus / "clips.jsonl") if r["category"] == "ru"][:2]
    parts = []
    for r in rows:  # each clip's speech as Silero VAD finds it, no silence kept around it
        plan = analyse(str(corpus / r["path"]), SegmentOptions(speech_pad_ms=0, whole_file_max_s=1.0))
        parts.append(load_audio(str(corpus / r["path"]))[plan.segments[0][0]:plan.segments[-1][1]])
    gap = np.zeros(2 * SAMPLE_RATE, np.float32)
    audio = np.concatenate([parts[0], gap, parts[1]])
    gap_start, gap_end = len(parts[0]) / SAMPLE_RATE, (len(parts[0]) + len(gap)) / SAMPLE_RATE
    dec = load_decoder(DecodeOptions(model=str(base_model), engine=engine, word_timestamps=True), "cpu", 2)
    out, = dec.decode([SegmentInput(audio, "russian", 96)])
    _check_words([out], [audio])
    # as the pipeline reports them: trimmed to the speech the VAD found (here: the two clips' speech); the
    # alignment alone can stretch the word before a pause over part of it
    speech = [(0.0, gap_start), (gap_end, len(audio) / SAMPLE_RATE)]
    words = [dataclasses.replace(w, start_s=a, end_s=b)
             for w, (a, b) in zip(out.words, fit_to_speech([(w.start_s, w.end_s) for w in out.words], speech))]
    mid = (gap_start + gap_end) / 2
    before = [w for w in words if w.end_s <= mid]
    after = [w for w in words if w.start_s >= mid]
    assert before and after and len(before) + len(after) == len(words), out.words
    assert abs(before[-1].end_s - gap_start) <= 0.4 and abs(after[0].start_s - gap_end) <= 0.4, words


@pytest.mark.e2e
def test_a_word_timed_run_keeps_the_text_and_writes_words_languages_and_cues(tmp_path, corpus, tiny_model):
    """``krasr-batch run`` with and without --word-timestamps (tiny-random, --language auto --languages kk,ru;
    each in its own process): the same segments, a words/ row set for every segment with text, seconds by
    language in files/, and subtitle cues within the limits. The engine is named, so that both runs use it
    whatever ``--engine auto`` picks on this CPU."""
    import pyarrow.dataset as pads

    from krasr_batch.export import export
    from krasr_batch.output import open_output
    from tests.test_export_inspect import _srt_cues

    rows = read_jsonl(corpus / "clips.jsonl")[:4] + read_jsonl(corpus / "long.jsonl")[:1]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": r["id"], "path": str(corpus / r["path"])}) + "\n" for r in rows))
    common = ["--model", str(tiny_model), "--language", "auto", "--languages", "kk,ru", "--token-limit", "card",
              "--flush-files", "2", "--num-cpus", "2", "--no-progress", "--engine", "ctranslate2"]
    outs = {}
    for words in (False, True):
        outs[words] = tmp_path / f"out-{words}"
        flag = "--word-timestamps" if words else "--no-word-timestamps"
        r = run_cli(["run", str(manifest), "--out", str(outs[words]), *common, flag], timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        info = json.loads((outs[words] / "run.json").read_text())
        statuses = pads.dataset(outs[words] / "files", format="parquet").to_table().column("status").to_pylist()
        assert statuses == ["ok"] * len(rows), info
    assert not (outs[False] / "words").exists()

    def table(out, name):
        return pads.dataset(out / name, format="parquet").to_table().to_pylist()

    keep = ("file_id", "segment_index", "start_s", "end_s", "audio_s", "text", "language", "language_prob",
            "num_tokens")
    plain = sorted(({k: r[k] for k in keep} for r in table(outs[False], "segments")), key=lambda r: (r["file_id"], r["segment_index"]))
    segs = sorted(({k: r[k] for k in keep} for r in table(outs[True], "segments")), key=lambda r: (r["file_id"], r["segment_index"]))
    assert segs == plain and len(segs) > len(rows)  # the long recording has several windows
    assert {s["language"] for s in segs} <= {"kk", "ru"} and all(0 < s["language_prob"] <= 1 for s in segs)

    words = {}
    for w in table(outs[True], "words"):
        words.setdefault((w["file_id"], w["segment_index"]), []).append(w)
    with_text = [s for s in segs if s["text"]]
    assert with_text and set(words) == {(s["file_id"], s["segment_index"]) for s in with_text}
    for s in with_text:
        ws = sorted(words[(s["file_id"], s["segment_index"])], key=lambda w: w["word_index"])
        assert [w["word_index"] for w in ws] == list(range(len(ws)))
        assert "".join(w["word"] for w in ws).strip() == s["text"]
        assert all(s["start_s"] <= w["start_s"] <= w["end_s"] <= s["end_s"] for w in ws)
        assert all(a["end_s"] <= b["start_s"] for a, b in zip(ws, ws[1:]))

    for f in table(outs[True], "files"):
        mine = [s for s in with_text if s["file_id"] == f["file_id"]]
        got = dict(f["language_s"])
        assert set(got) <= {"kk", "ru"}
        # seconds of audio the model heard (a window's span less the pause middles it skipped)
        assert sum(got.values()) == pytest.approx(sum(s["audio_s"] for s in mine), abs=1e-3)

    output = open_output(str(outs[True]))
    assert output.words_parts and not open_output(str(outs[False])).words_parts  # what export's note goes by
    export(output, "srt")
    long_name = next((outs[True] / "export" / "srt").glob("long_00*.srt"))
    cues = _srt_cues(long_name.read_text(encoding="utf-8"))
    assert len(cues) >= len([s for s in with_text if s["file_id"] == "long_00"])
    for _, start, end, text in cues:
        lines = text.split("\n")
        # only a cue of one word may last longer (word_cues: a word is never split)
        assert len(lines) <= MAX_CUE_LINES and (end - start <= MAX_CUE_S + 0.001 or " " not in text.strip())
        assert all(len(line) <= MAX_LINE_CHARS or " " not in line for line in lines)
    export(output, "jsonl")
    lines = [json.loads(x) for p in (outs[True] / "export" / "jsonl").glob("*.jsonl")
             for x in p.read_text(encoding="utf-8").splitlines()]
    assert lines and all("words" in x and "".join(w["word"] for w in x["words"]).strip() == x["text"] for x in lines)


# ---------------------------------------------------------------- the benchmark's saved runs

def test_saved_runs_merge_with_each_block_naming_the_run_its_rows_come_from():
    from benchmarks.words import merge, report_blocks

    def cost(pct):
        return {"wall_plain_s": 10.0, "wall_words_s": 10.0 + pct / 10, "wall_pct": pct, "model_plain_s": 8.0,
                "model_words_s": 8.5, "model_pct": 6.25, "runs": 1, "same_text": True}

    both = {"start": {"median": 0.1, "p90": 0.2, "signed": 0.0, "n": 2}}
    bounds = {k: both["start"] for k in ("start", "end", "both", "sound_start", "sound_end", "sound_both")}
    old_tf = {"engines": ["transformers"], "meta": "- run A\n", "cost": {"transformers": cost(8.0)}}
    ct2 = {"engines": ["ctranslate2"], "meta": "- run B\n", "audio_s": 1.0, "files": 1, "sentences": 2,
           "boundaries": {"ctranslate2": bounds}, "cost": {"ctranslate2": cost(14.8)},
           "found": {"ctranslate2": {"f": [(0.0, 1.0), (2.0, 3.0)]}}}
    new_tf = {"engines": ["transformers"], "meta": "- run C\n", "audio_s": 1.0, "files": 1, "sentences": 2,
              "boundaries": {"transformers": bounds}, "cost": {"transformers": cost(5.0)},
              "found": {"transformers": {"f": [(0.1, 1.0), (2.0, 3.3)]}}}
    ct2_cost = {"engines": ["ctranslate2"], "meta": "- run D\n", "audio_s": 1.0, "files": 1,
                "cost": {"ctranslate2": cost(9.0)}}
    r = merge([old_tf, ct2, new_tf, ct2_cost])
    assert r["cost"]["transformers"]["wall_pct"] == 5.0 and r["cost"]["ctranslate2"]["wall_pct"] == 9.0
    assert r["agreement"]["n"] == 4 and r["agreement"]["median"] == pytest.approx(0.05)
    blocks = report_blocks(r, r["meta"])
    assert "run B" in blocks["words-boundaries"] and "run C" in blocks["words-boundaries"]
    assert "run A" not in blocks["words-cost"] and "run B" not in blocks["words-cost"]
    assert "- transformers rows:\n  - run C" in blocks["words-cost"] and "- ctranslate2 rows:\n  - run D" in blocks["words-cost"]
    assert "Engines agree" in blocks["words-boundaries"]


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (6, 40), (40, 300)])
def test_the_time_warping_and_median_filter_are_transformers(shape):
    """timing.dynamic_time_warping (diagonal at a time) and median_filter (a min/max network): transformers'
    _dynamic_time_warping and _median_filter, path for path and value for value, ties included."""
    import torch
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter

    from krasr_batch.engines.timing import dynamic_time_warping, median_filter

    rng = np.random.default_rng(sum(shape))
    for matrix in (rng.normal(size=shape), rng.integers(-2, 2, shape).astype(np.float64)):  # the second: ties
        want, got = _dynamic_time_warping(matrix), dynamic_time_warping(matrix)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    x = torch.from_numpy(rng.normal(size=(3,) + shape).astype(np.float32))
    assert torch.equal(median_filter(x, 7), _median_filter(x, 7))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_text_that_fills_the_models_positions_is_timed_to_its_last_word(engine, tiny_model):
    """A window cut short at the model's most tokens (448 positions less the prompt) leaves the alignment pass
    no position for end-of-text: it is still timed, every word of its text, none past the audio (each engine
    used to fail the batch there). Noise and no repetition rules: random weights then run to the limit."""
    from krasr_batch.engines import MODEL_MAX_NEW_TOKENS

    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, SAMPLE_RATE * 29).astype(np.float32)
    dec = load_decoder(DecodeOptions(model=str(tiny_model), engine=engine, word_timestamps=True,
                                     no_repeat_ngram_size=0, repetition_penalty=1.0), "cpu", 1)
    out, = dec.decode([SegmentInput(audio, "kazakh", MODEL_MAX_NEW_TOKENS)])
    assert out.truncated and out.num_tokens == MODEL_MAX_NEW_TOKENS  # the case itself, not a shorter text
    _check_words([out], [audio])
