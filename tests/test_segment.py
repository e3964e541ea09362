import numpy as np
import pytest

from krasr_batch.audio import load_audio
from krasr_batch.segment import (
    FRAME,
    QUIET_BELOW_DBFS,
    _split_long,
    analyse,
    file_level,
    loudest_dbfs,
    plan_segments,
    quiet_gain_db,
    segment_audio,
)
from krasr_batch.settings import SegmentOptions

from .conftest import read_jsonl

SR = 16000


@pytest.mark.parametrize("max_segment_s", [30.0, 12.0])
def test_long_recordings_spans_inside_segments(corpus, max_segment_s):
    opts = SegmentOptions(max_segment_s=max_segment_s)
    spans = read_jsonl(corpus / "spans.jsonl")
    for rec in read_jsonl(corpus / "long.jsonl"):
        plan = analyse(str(corpus / rec["path"]), opts)
        assert abs(plan.duration_s - rec["duration_s"]) < 0.1
        segs = [(s / SR, e / SR) for s, e in plan.segments]
        assert segs, rec["id"]
        assert all(plan.audio_samples(k) <= max_segment_s * SR for k in range(len(segs)))
        assert all(b[0] >= a[1] - 1e-9 for a, b in zip(segs, segs[1:])), "segments overlap or are out of order"
        assert 0 <= segs[0][0] and segs[-1][1] <= plan.duration_s + 1e-9
        stretches = [(s / SR, e / SR) for k in range(len(segs)) for s, e in plan.window_pieces(k)]
        assert all(b[0] >= a[1] for a, b in zip(stretches, stretches[1:])), "stretches overlap"
        mine = [x for x in spans if x["id"] == rec["id"]]
        assert mine
        # every spoken sentence lies inside one stretch of one window: no skipped pause and no window edge
        # cuts it. The reference spans hold the synthesizer's trailing silence too; 50 ms of slack covers
        # where that silence meets the next sentence.
        outside = [x for x in mine
                   if not any(s - 0.05 <= x["start_s"] and x["end_s"] <= e + 0.05 for s, e in stretches)]
        if max_segment_s == 30.0:
            assert outside == []
        else:  # shorter windows: a long mixed sentence may need a cut, at a pause inside it
            assert len(outside) <= len(mine) // 10
        # each window knows the VAD's speech inside it (word times are trimmed to it): in order, inside the
        # window, and every sentence starts where some speech starts (the synthesizer starts on the sound)
        speech = [(a / SR, b / SR) for k in range(len(segs)) for a, b in plan.window_speech(k)]
        assert all(s <= a < b <= e for k, (s, e) in enumerate(segs) for a, b in
                   [(x / SR, y / SR) for x, y in plan.window_speech(k)])
        assert all(b[0] >= a[1] for a, b in zip(speech, speech[1:]))
        assert all(min(abs(x["start_s"] - a) for a, _ in speech) < 0.15 for x in mine)
        # and the audio handed over is exactly the planned stretches, back to back
        for k, audio in enumerate(segment_audio(plan)):
            assert len(audio) == plan.audio_samples(k)


def test_long_pauses_inside_a_window_are_shortened_and_windows_hold_speech(corpus):
    """A pause longer than max_pause_s keeps max_pause_s of itself, so the corpus's long recordings (pauses
    of up to 8 s) need fewer windows than with every pause whole, each full of speech."""
    rec = read_jsonl(corpus / "long.jsonl")[0]
    compact = analyse(str(corpus / rec["path"]), SegmentOptions())
    whole = analyse(str(corpus / rec["path"]), SegmentOptions(max_pause_s=30.0))
    assert all(len(whole.window_pieces(k)) == 1 for k in range(len(whole.segments)))
    assert len(compact.segments) < len(whole.segments)
    for k in range(len(compact.segments)):
        parts = compact.window_pieces(k)
        # stretches are split only where a pause was longer than max_pause_s, and some of it was skipped
        assert all(b[0] - a[1] > 0 for a, b in zip(parts, parts[1:]))
        assert sum(e - s for s, e in parts) <= 30 * SR
    a, b = next(iter(segment_audio(compact))), compact.window_pieces(0)
    assert len(a) == sum(e - s for s, e in b)


def test_long_files_are_not_kept_in_memory(corpus):
    rec = read_jsonl(corpus / "long.jsonl")[0]
    kept = analyse(str(corpus / rec["path"]), SegmentOptions())
    streamed = analyse(str(corpus / rec["path"]), SegmentOptions(), keep_audio_s=10)
    assert streamed.audio is None and kept.audio is not None
    assert streamed.segments == kept.segments
    for a, b in zip(segment_audio(kept), segment_audio(streamed)):
        np.testing.assert_array_equal(a, b)


def test_short_clip_is_one_whole_window(corpus):
    clip = read_jsonl(corpus / "clips.jsonl")[0]
    plan = analyse(str(corpus / clip["path"]), SegmentOptions())
    assert plan.segments == [(0, int(round(plan.duration_s * SR)))]


def test_silence_has_no_segments(corpus):
    plan = analyse(str(corpus / "bad" / "silence_60s.wav"), SegmentOptions())
    assert plan.segments == [] and plan.speech_s == 0.0


def test_one_sentence_between_silences(corpus):
    plan = analyse(str(corpus / "bad" / "speech_in_silence.flac"), SegmentOptions())
    assert len(plan.segments) == 1
    s, e = plan.segments[0]
    assert 39.0 < s / SR < 40.5 and 41.5 < e / SR < 44.5


def test_how_much_a_quiet_file_is_raised():
    assert quiet_gain_db(-12.0, 50.0) == 0.0  # speech at an ordinary level: the card's input, untouched
    assert quiet_gain_db(QUIET_BELOW_DBFS, 50.0) == 0.0
    assert quiet_gain_db(-32.5, 50.0) == 17.5  # to a loudest frame at -15 dBFS
    assert quiet_gain_db(-80.0, 50.0) == 50.0  # at most max_gain_db
    assert quiet_gain_db(-42.0, 0.0) == 0.0  # --max-gain-db 0: the audio as it is
    assert quiet_gain_db(-95.0, 50.0) == 0.0 and quiet_gain_db(-float("inf"), 50.0) == 0.0  # silence, dither
    assert loudest_dbfs(np.array([0.0, 0.1, 0.01], np.float32)) == pytest.approx(-20.0)
    assert loudest_dbfs(np.zeros(3, np.float32)) == -float("inf") and loudest_dbfs(np.zeros(0)) == -float("inf")


def test_a_click_does_not_set_a_files_level():
    """file_level: the loudest frame, unless it stands alone far above what the file holds for 0.1 s."""
    speech = np.full(40, 10 ** (-60 / 20), np.float32)  # 1.3 s held at -60 dBFS
    speech[::7] = 10 ** (-52 / 20)  # louder single frames, as syllables make them: not clicks
    assert file_level(speech) == (pytest.approx(-52.0), None)
    clicked = speech.copy()
    clicked[11] = 10 ** (-6 / 20)  # one 32 ms frame holding a click
    level, click = file_level(clicked)
    assert level == pytest.approx(-52.0) and click == pytest.approx(-6.0)
    assert quiet_gain_db(level, 50.0) == 37.0  # raised as if the click were not there
    assert file_level(np.array([0.1, 0.001], np.float32)) == (pytest.approx(-20.0), None)  # too short to tell
    assert file_level(np.zeros(0, np.float32)) == (-float("inf"), None)
    assert file_level(np.zeros(9, np.float32)) == (-float("inf"), None)


def test_a_quiet_recording_with_a_click_is_raised_all_the_same(corpus, tmp_path):
    """A clip 45 dB down with one 1 ms click at -1 dBFS: its loudest frame (the click's, near -16 dBFS) said it
    was not quiet, and the VAD found 1.6 of its 2.8 s of speech."""
    import soundfile as sf

    own = load_audio(str(corpus / "clips" / "ru_000.wav"))
    quiet = own * 10 ** (-45 / 20)
    quiet[20000:20016] = 0.9
    sf.write(tmp_path / "click.wav", quiet, SR, subtype="FLOAT")
    plan = analyse(str(tmp_path / "click.wav"), SegmentOptions())
    assert plan.gain > 10 ** (40 / 20) and plan.warnings[0].startswith("quiet: its loudest moment is at -")
    assert "(a click at -16." in plan.warnings[0]
    assert plan.speech_s >= 0.95 * analyse(str(corpus / "clips" / "ru_000.wav"), SegmentOptions()).speech_s
    (window,) = list(segment_audio(plan))  # raised within full scale: the click clipped, the speech as raised
    np.testing.assert_allclose(window, np.clip(quiet * np.float32(plan.gain), -1, 1), atol=1e-5)
    assert np.abs(window).max() == 1.0 and np.abs(np.delete(window, range(20000, 20016))).max() < 1.0


@pytest.mark.parametrize("clip", ["kk_020.wav", "ru_000.wav", "mixed_040.wav"])
def test_a_quiet_recording_is_raised_for_the_vad_and_the_model(corpus, tmp_path, clip):
    """The same clip 50 dB down (its loudest 32 ms near -62 dBFS): Silero finds no speech in it as it is;
    raised, it finds what it finds at the clip's own level, and the model gets the clip's own samples back
    (within float32 rounding and the 16-bit file's quantisation)."""
    import soundfile as sf

    own = load_audio(str(corpus / "clips" / clip))
    quiet = tmp_path / clip
    sf.write(quiet, own * 10 ** (-50 / 20), SR, subtype="FLOAT")
    as_is = analyse(str(quiet), SegmentOptions(max_gain_db=0))
    assert as_is.gain == 1.0 and as_is.speech_s < 0.5 * analyse(str(corpus / "clips" / clip), SegmentOptions()).speech_s
    raised = analyse(str(quiet), SegmentOptions())
    level = loudest_dbfs(np.sqrt(np.mean(own[:len(own) // FRAME * FRAME].reshape(-1, FRAME) ** 2, axis=1)))
    assert 20 * np.log10(raised.gain) == pytest.approx(-15.0 - (level - 50.0), abs=0.05)
    assert raised.warnings and raised.warnings[0].startswith("quiet: its loudest moment is at -6")
    assert raised.speech_s > 0.8 * len(own) / SR and raised.segments == [(0, len(own))]
    (window,) = list(segment_audio(raised))
    assert window.dtype == np.float32
    np.testing.assert_allclose(window, own * 10 ** ((-50 + 20 * np.log10(raised.gain)) / 20), atol=1e-5)
    streamed = analyse(str(quiet), SegmentOptions(), keep_audio_s=1)  # a long file's path: a second decode
    assert streamed.audio is None and streamed.gain == raised.gain and streamed.segments == raised.segments
    np.testing.assert_array_equal(next(iter(segment_audio(streamed))), window)


def test_an_ordinary_level_is_never_raised(corpus):
    for clip in read_jsonl(corpus / "clips.jsonl"):
        plan = analyse(str(corpus / clip["path"]), SegmentOptions())
        assert plan.gain == 1.0 and not any(w.startswith("quiet") for w in plan.warnings), clip["path"]
    assert analyse(str(corpus / "bad" / "silence_60s.wav"), SegmentOptions()).gain == 1.0


def test_continuous_speech_is_cut_at_the_quietest_frame():
    # 70 s of "speech" whose energy dips at 20 s and 47 s
    n = 70 * SR // FRAME
    energy = np.ones(n, np.float32)
    for t in (20.0, 47.0):
        energy[int(t * SR / FRAME)] = 0.01
    pieces = _split_long((0, n * FRAME), energy, 30 * SR)
    cuts = [e / SR for _, e in pieces[:-1]]
    assert cuts == pytest.approx([20.0, 47.0], abs=0.04)
    assert all(e - s <= 30 * SR for s, e in pieces)


def test_plan_breaks_at_the_longest_pause():
    # speech 0-9 s, pause 0.2 s, 9.2-20 s, pause 2 s, 22-31 s, pause 0.3 s, 31.3-40 s
    probs = np.zeros(45 * SR // FRAME, np.float32)
    for s, e in [(0, 9), (9.2, 20), (22, 31), (31.3, 40)]:
        probs[int(s * SR / FRAME):int(e * SR / FRAME)] = 0.9
    energy = probs.copy()
    segs, speech = plan_segments(probs, energy, 45 * SR, SegmentOptions(whole_file_max_s=30))
    bounds = [(round(s / SR, 1), round(e / SR, 1)) for s, e in segs]
    assert len(bounds) == 2
    assert bounds[0][1] <= 22.0 and bounds[1][0] >= 20.0  # the cut is in the 2 s pause
    assert all(e - s <= 30 for s, e in bounds)
    assert 35 < speech < 41


def _segment_rows(corpus, rec, token_limit):
    from krasr_batch.pipeline.stages import segment_file

    row = {"file_id": rec["id"], "path": str(corpus / rec["path"]), "line": 1, "language": None,
           "reference_text": None, "extra_json": None}
    return [r for r in segment_file(row, SegmentOptions(), "kazakh", None, token_limit) if r["segment_index"] >= 0]


def test_a_clip_decoded_whole_keeps_the_cards_limit_and_long_windows_get_the_budget(corpus):
    from krasr_batch.engines import max_new_tokens_for, segment_token_limit

    clip = read_jsonl(corpus / "clips.jsonl")[0]
    (only,) = _segment_rows(corpus, clip, "fit")
    assert only["start_s"] == 0.0 and only["max_new_tokens"] == max_new_tokens_for(only["end_s"])
    long_rows = _segment_rows(corpus, read_jsonl(corpus / "long.jsonl")[0], "fit")
    assert len(long_rows) > 1
    for r in long_rows:
        assert r["max_new_tokens"] == segment_token_limit(len(r["audio"]) / 4 / SR, False, "fit")  # the audio decoded
    assert any(r["max_new_tokens"] > max_new_tokens_for(r["audio_s"]) for r in long_rows)
    assert all(r["audio_s"] == len(r["audio"]) / 4 / SR for r in long_rows)
    card_rows = _segment_rows(corpus, read_jsonl(corpus / "long.jsonl")[0], "card")
    assert [(r["start_s"], r["end_s"]) for r in card_rows] == [(r["start_s"], r["end_s"]) for r in long_rows]
    assert all(r["max_new_tokens"] == max_new_tokens_for(len(r["audio"]) / 4 / SR) for r in card_rows)


def test_a_files_warning_from_its_input_comes_first_in_its_row(corpus):
    """A warning the input's reader gave (a sidecar text not in UTF-8) goes into the file's row before the
    audio's own, on a file that fails as on one that does not."""
    from krasr_batch.pipeline.stages import FILE_ROW, segment_file

    bad = {r["id"]: r for r in read_jsonl(corpus / "bad.jsonl")}
    said = "sidecar: /x/a.txt is not UTF-8 (invalid continuation byte at byte 1), so the file has no reference text"

    def file_row(rec, warning):
        row = {"file_id": rec["id"], "path": str(corpus / rec["path"]), "line": 1, "language": None,
               "reference_text": None, "extra_json": None, "warning": warning}
        rows = list(segment_file(row, SegmentOptions(), "kazakh", None, "fit"))
        assert rows[-1]["segment_index"] == FILE_ROW and all(r["warning"] == rows[-1]["warning"] for r in rows)
        return rows[-1]

    nan = file_row(bad["nan_samples.wav"], said)  # the audio's own warning follows
    assert nan["status"] == "ok" and nan["warning"].startswith(said + "; nonfinite: "), nan["warning"]
    assert file_row(bad["nan_samples.wav"], None)["warning"].startswith("nonfinite: ")
    clip = read_jsonl(corpus / "clips.jsonl")[0]
    assert file_row(clip, said)["warning"] == said and file_row(clip, None)["warning"] is None
    empty = file_row(bad["empty.wav"], said)
    assert (empty["status"], empty["error_kind"], empty["warning"]) == ("error", "empty_file", said)


@pytest.mark.parametrize("seed", range(6))
def test_speech_timestamps_equal_silero_vads_own_state_machine(seed):
    """krasr-batch's torch-free copy of Silero's state machine gives silero-vad's own spans."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    from krasr_batch.segment import speech_timestamps

    rng = np.random.default_rng(seed)
    # runs of speech and silence of random lengths, with noisy probabilities around the thresholds
    runs = rng.integers(1, 60, 80)
    levels = np.repeat(rng.choice([0.05, 0.3, 0.42, 0.6, 0.95], len(runs)), runs)
    probs = np.clip(levels + rng.normal(0, 0.08, len(levels)), 0, 1).astype(np.float32).tolist()
    total = len(probs) * FRAME + int(rng.integers(0, FRAME))
    for threshold, min_speech, min_silence, pad in [(0.5, 250, 100, 30), (0.4, 100, 300, 200), (0.6, 0, 50, 0)]:
        ref = get_speech_timestamps_from_probs(
            probs, sampling_rate=SR, threshold=threshold, min_speech_duration_ms=min_speech,
            min_silence_duration_ms=min_silence, speech_pad_ms=pad, audio_length_samples=total)
        mine = speech_timestamps(probs, total, threshold, min_speech, min_silence, pad)
        assert mine == [(s["start"], s["end"]) for s in ref], (threshold, min_speech, min_silence, pad)
        assert mine  # the sequence has speech: the comparison is not between two empty lists


def test_the_decode_and_segment_stage_never_imports_torch(corpus):
    """torch's import is about 2 s and 250 MB of every decode-and-segment worker; the VAD does not need it."""
    import os
    import subprocess
    import sys

    rec = read_jsonl(corpus / "long.jsonl")[0]
    code = ("import sys; from krasr_batch.segment import analyse, segment_audio; "
            "from krasr_batch.settings import SegmentOptions; "
            f"p = analyse({str(corpus / rec['path'])!r}, SegmentOptions()); "
            "n = sum(1 for _ in segment_audio(p)); assert n == len(p.segments) > 1, n; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(n)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0 and int(r.stdout.strip()) > 1, r.stderr[-2000:]


def test_a_window_ends_at_a_clear_pause_in_its_last_fifth_rather_than_half_empty():
    # speech 0-16 s, pause 2 s, 18-26 s, pause 0.4 s, 26.4-40 s: the 2 s pause would leave the first window
    # with 16 s of speech; the 0.4 s pause in the window's last fifth fills it with 25 s
    probs = np.zeros(45 * SR // FRAME, np.float32)
    for s, e in [(0, 16), (18, 26), (26.4, 40)]:
        probs[int(s * SR / FRAME):int(e * SR / FRAME)] = 0.9
    segs, _ = plan_segments(probs, probs.copy(), 45 * SR, SegmentOptions(whole_file_max_s=30))
    bounds = [(round(s / SR, 2), round(e / SR, 2)) for s, e in segs]
    assert len(bounds) == 2
    assert 26.0 <= bounds[0][1] <= 26.4 and bounds[1][0] >= bounds[0][1]  # the cut is in the 0.4 s pause
    # with no clear pause in the last fifth, the longest pause of the second half still decides
    probs[int(26 * SR / FRAME):int(26.4 * SR / FRAME)] = 0.9  # speech runs on from 18 to 40 s
    probs[int(26.4 * SR / FRAME):int(26.6 * SR / FRAME)] = 0.0  # only a 0.2 s pause there
    segs, _ = plan_segments(probs, probs.copy(), 45 * SR, SegmentOptions(whole_file_max_s=30))
    assert 16.0 <= segs[0][1] / SR <= 18.0


def test_word_times_map_from_a_window_that_skips_a_pause_to_the_source():
    import json

    from krasr_batch.pipeline.stages import source_time

    # two stretches: 10.0-12.0 s and 20.0-21.5 s of the source (the 8 s between them lost their middle)
    to_source = source_time(json.dumps([[10.0, 12.0], [20.0, 21.5]]), 10.0)
    assert to_source(0.5) == 10.5 and to_source(2.0) == 12.0
    assert abs(to_source(2.5) - 20.5) < 1e-9 and to_source(9.0) == 21.5
    assert source_time(None, 3.0)(1.25) == 4.25  # a window of one stretch: its start plus the offset


@pytest.mark.parametrize("max_segment_s", [30.0, 10.0])
def test_no_recording_makes_more_windows_than_the_bound_small_jobs_are_sized_by(max_segment_s):
    """orchestrate.model_blocks_bound counts at most 2 * ceil(duration / max_segment_s) + 1 windows a
    recording: checked on random speech of every shape (long stretches, many short ones, long pauses)."""
    import math

    from krasr_batch.segment import windows_from_spans

    rng = np.random.default_rng(7)
    opts = SegmentOptions(max_segment_s=max_segment_s)
    for trial in range(300):
        total_s = float(rng.uniform(max_segment_s + 1, 900))
        n = int(total_s * SR)
        spans, t = [], float(rng.uniform(0, 3))
        speech_mean, pause_mean = rng.choice([0.3, 2.0, 8.0, 40.0]), rng.choice([0.1, 0.5, 2.0, 20.0])
        while t < total_s:
            e = min(total_s, t + rng.exponential(speech_mean) + 0.05)
            spans.append((int(t * SR), int(e * SR)))
            t = e + rng.exponential(pause_mean) + 0.02
        energy = rng.uniform(0.01, 1.0, n // FRAME + 1).astype(np.float32)
        windows = windows_from_spans(spans, energy, n, opts)
        assert len(windows) <= 2 * math.ceil(total_s / max_segment_s) + 1, (trial, total_s, len(windows))
