import os
import struct

import numpy as np
import pytest
import soundfile as sf

from krasr_batch.audio import SAMPLE_RATE, AudioError, DecodeReport, check_path, load_audio, wav_declared_frames

from .conftest import read_jsonl


def test_every_corpus_format_decodes_to_16k_mono(corpus):
    clips = read_jsonl(corpus / "clips.jsonl")
    seen = set()
    for c in clips:
        ext = os.path.splitext(c["path"])[1]
        if ext in seen:
            continue
        seen.add(ext)
        report = DecodeReport()
        audio = load_audio(str(corpus / c["path"]), report)
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert report.source_rate in (8000, 16000, 22050, 44100, 48000)
        assert abs(len(audio) / SAMPLE_RATE - report.decoded_s) < 0.06, c["path"]
        assert np.abs(audio).max() > 0.01
        assert report.warnings() == [], (c["path"], report.warnings())
    assert {".wav", ".flac", ".ogg", ".mp3"} <= seen


def test_resampling_keeps_a_tone(tmp_path):
    t = np.arange(44100 * 2) / 44100
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "tone.flac", np.stack([x, x], 1), 44100)
    y = load_audio(str(tmp_path / "tone.flac"))
    assert abs(len(y) - 32000) <= 2
    spec = np.abs(np.fft.rfft(y[1000:-1000]))
    assert abs(np.argmax(spec) * SAMPLE_RATE / len(y[1000:-1000]) - 440) < 2


def test_pyav_reads_what_libsndfile_cannot(tmp_path, corpus):
    import av

    src = load_audio(str(corpus / "clips" / sorted(os.listdir(corpus / "clips"))[0]))
    path = tmp_path / "x.m4a"
    with av.open(str(path), "w") as out:
        st = out.add_stream("aac", rate=SAMPLE_RATE)
        st.layout = "mono"
        frame = av.AudioFrame.from_ndarray(src[None, :], format="flt", layout="mono")
        frame.rate = SAMPLE_RATE
        for p in st.encode(frame):
            out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    report = DecodeReport()
    y = load_audio(str(path), report)
    assert report.backend == "pyav"
    assert abs(len(y) - len(src)) < 0.1 * SAMPLE_RATE


def _speech(corpus, index=0):
    return load_audio(str(corpus / "clips" / sorted(os.listdir(corpus / "clips"))[index]))


def _write_m4a(path, audio: np.ndarray):
    """(frames, channels) float32 at 16 kHz -> AAC in MP4 (libsndfile cannot read it: PyAV decodes it)."""
    import av

    layout = {1: "mono", 2: "stereo"}[audio.shape[1]]
    with av.open(str(path), "w") as out:
        st = out.add_stream("aac", rate=SAMPLE_RATE)
        st.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T), format="fltp", layout=layout)
        frame.rate = SAMPLE_RATE
        for p in st.encode(frame):
            out.mux(p)
        for p in st.encode(None):
            out.mux(p)


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.mark.parametrize("fmt", ["wav", "m4a"])
def test_a_channel_in_opposite_phase_is_inverted_not_cancelled(tmp_path, corpus, fmt):
    x = _speech(corpus)
    stereo = np.stack([x, -x], 1)
    assert _rms(stereo.mean(axis=1)) == 0  # what a plain average (and ffmpeg -ac 1) makes of it: silence
    path = tmp_path / f"phase.{fmt}"
    sf.write(path, stereo, SAMPLE_RATE, subtype="FLOAT") if fmt == "wav" else _write_m4a(path, stereo)
    report = DecodeReport()
    y = load_audio(str(path), report)
    assert report.backend == ("soundfile" if fmt == "wav" else "pyav")
    assert _rms(y) == pytest.approx(_rms(x), rel=0.05)
    (channel, seconds), = report.inverted.items()  # the quieter of the two (AAC may make either the louder)
    assert channel == 2 or fmt == "m4a"
    assert seconds == pytest.approx(len(x) / SAMPLE_RATE, abs=0.1)
    assert [w for w in report.warnings() if w.startswith(f"phase: channel {channel} of 2 for ")] == report.warnings()


def test_hum_in_opposite_phase_under_speech_in_phase_keeps_the_speech(tmp_path, corpus):
    """A correlation over the raw samples is the hum's when a strong hum is in opposite phase between the
    channels: inverting a channel then cancelled the speech and kept the hum. Over the speech band (first
    differences) the speech decides, at telephone and studio rates alike."""
    import soxr

    x16 = _speech(corpus)
    for rate in (8000, 16000, 48000):
        x = x16 if rate == SAMPLE_RATE else soxr.resample(x16, SAMPLE_RATE, rate).astype(np.float32)
        hum = 0.5 * np.sin(2 * np.pi * 50 * np.arange(len(x)) / rate).astype(np.float32)
        sf.write(tmp_path / "hum.wav", np.stack([x + hum, x - hum], 1) / 1.5, rate, subtype="FLOAT")
        report = DecodeReport()
        y = load_audio(str(tmp_path / "hum.wav"), report)
        n = min(len(y), len(x16))
        assert report.inverted == {} and np.corrcoef(y[:n], x16[:n])[0, 1] > 0.98, rate


def test_channels_are_averaged_as_they_are_unless_one_opposes_the_loudest(tmp_path, corpus):
    x, other = _speech(corpus, 0), _speech(corpus, 1)
    n = min(len(x), len(other))
    x, other = x[:n], 0.8 * other[:n]
    sf.write(tmp_path / "two.wav", np.stack([x, other], 1), SAMPLE_RATE, subtype="FLOAT")
    report = DecodeReport()
    y = load_audio(str(tmp_path / "two.wav"), report)
    np.testing.assert_allclose(y, (x + other) / 2, atol=1e-6)  # two voices: both kept, nothing inverted
    assert report.inverted == {} and report.warnings() == []
    sf.write(tmp_path / "three.wav", np.stack([x, other, -0.5 * x], 1), SAMPLE_RATE, subtype="FLOAT")
    report = DecodeReport()
    y = load_audio(str(tmp_path / "three.wav"), report)
    np.testing.assert_allclose(y, (x + other + 0.5 * x) / 3, atol=1e-6)
    assert list(report.inverted) == [3]
    assert report.warnings()[0].startswith("phase: channel 3 of 3 for ")


def test_wav_header_declared_length(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    head = (tmp_path / "a.wav").read_bytes()
    assert wav_declared_frames(head) == 16000
    assert wav_declared_frames(b"not a wav") is None


def test_file_cut_short_is_flagged_not_passed_off(tmp_path):
    x = (0.1 * np.random.default_rng(0).normal(size=16000 * 4)).astype(np.float32)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    report = DecodeReport()
    y = load_audio(str(tmp_path / "cut.wav"), report)
    assert abs(len(y) / 16000 - 2.0) < 0.01
    assert report.declared_s == pytest.approx(4.0)
    assert any(w.startswith("truncated") for w in report.warnings())


def test_header_that_lies_about_its_length(tmp_path):
    x = np.zeros(16000 * 3, np.float32)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    data = bytearray((tmp_path / "a.wav").read_bytes())
    pos = data.index(b"data")
    struct.pack_into("<I", data, pos + 4, 16000 * 2 * 60)  # claims a minute
    (tmp_path / "lie.wav").write_bytes(bytes(data))
    report = DecodeReport()
    load_audio(str(tmp_path / "lie.wav"), report)
    assert report.declared_s == pytest.approx(60.0)
    assert any("60.00 s the header declares" in w for w in report.warnings())


def test_nan_samples_become_silence_with_a_warning(corpus):
    report = DecodeReport()
    y = load_audio(str(corpus / "bad" / "nan_samples.wav"), report)
    assert np.isfinite(y).all()
    assert report.nonfinite_samples == 100
    assert "NaN" in report.warnings()[0]


@pytest.mark.parametrize("name, kind", [
    ("empty.wav", "empty_file"), ("a dir.wav", "not_a_file"), ("does_not_exist.wav", "not_found"),
])
def test_check_path_causes(corpus, name, kind):
    with pytest.raises(AudioError) as e:
        check_path(str(corpus / "bad" / name))
    assert e.value.kind == kind


def test_symlink_loop_and_permissions_and_root(tmp_path, corpus):
    os.symlink(tmp_path / "b.wav", tmp_path / "a.wav")
    os.symlink(tmp_path / "a.wav", tmp_path / "b.wav")
    with pytest.raises(AudioError) as e:
        check_path(str(tmp_path / "a.wav"))
    assert e.value.kind == "symlink_loop"
    clip = corpus / "clips" / sorted(os.listdir(corpus / "clips"))[0]
    with pytest.raises(AudioError) as e:
        check_path(str(clip), input_root=str(tmp_path))
    assert e.value.kind == "outside_input_root"
    os.symlink(clip, tmp_path / "link.wav")  # a link inside the root that points outside it
    with pytest.raises(AudioError) as e:
        check_path(str(tmp_path / "link.wav"), input_root=str(tmp_path))
    assert e.value.kind == "outside_input_root"
    check_path(str(clip), input_root=str(corpus))
    if os.geteuid() != 0:  # root reads everything
        p = tmp_path / "secret.wav"
        p.write_bytes(clip.read_bytes())
        p.chmod(0)
        with pytest.raises(AudioError) as e:
            check_path(str(p))
        assert e.value.kind == "permission_denied"


@pytest.mark.parametrize("name, kind", [
    ("truncated.wav", "truncated"), ("noise_bytes.wav", "undecodable"), ("text.mp3", "undecodable"),
])
def test_undecodable_inputs(corpus, name, kind):
    with pytest.raises(AudioError) as e:
        load_audio(str(corpus / "bad" / name))
    assert e.value.kind == kind


def test_a_metadata_tag_that_is_not_utf8_does_not_fail_the_audio(tmp_path, corpus):
    """A tagger that wrote its local code page (cp1251) into an MP4's tags: PyAV's strict UTF-8 reading of the
    metadata raised UnicodeDecodeError, and the file failed as ``internal``. The same bytes as random data
    named .wav (the corpus generator's, seed 9001) failed that way too."""
    src = _speech(corpus)
    path = tmp_path / "tagged.m4a"
    _write_m4a(path, src[:, None])
    data = path.read_bytes()
    at = data.find(b"Lavf")  # the encoder tag PyAV's muxer writes, overwritten in place (the atoms keep their sizes)
    assert at > 0
    path.write_bytes(data[:at] + "Запись".encode("cp1251")[:4] + data[at + 4:])
    report = DecodeReport()
    y = load_audio(str(path), report)
    assert report.backend == "pyav" and abs(len(y) - len(src)) < 0.1 * SAMPLE_RATE


@pytest.mark.parametrize("which", [0, 1])
def test_garbage_in_the_middle_of_a_compressed_stream(tmp_path, corpus, which):
    """libsndfile gives up at the first corrupt MPEG frame; PyAV resyncs and keeps the timeline, flagged."""
    import json
    import random

    from krasr_batch.segment import analyse
    from krasr_batch.settings import SegmentOptions

    rec = [json.loads(x) for x in (corpus / "long.jsonl").read_text().splitlines()][which]
    data = bytearray((corpus / rec["path"]).read_bytes())
    rng = random.Random(0)
    mid = len(data) // 2
    data[mid:mid + 20000] = bytes(rng.getrandbits(8) for _ in range(20000))
    path = tmp_path / ("damaged" + os.path.splitext(rec["path"])[1])
    path.write_bytes(bytes(data))
    plan = analyse(str(path), SegmentOptions())
    assert plan.duration_s > 0.95 * rec["duration_s"]  # the second half is not lost
    assert plan.warnings and any("corrupt" in w or "truncated" in w for w in plan.warnings)
    # speech is found on both sides of the damage: windows run to the end of the recording
    assert len(plan.segments) >= 3 and plan.segments[-1][1] > 0.9 * plan.duration_s * 16000


@pytest.mark.parametrize("uri, kind", [
    ("http://127.0.0.1:9/nobody/serves/this.wav", "not_found"),
    ("ftp://example.invalid/a.wav", "unsupported_uri"),
])
def test_urls_that_cannot_be_read(uri, kind):
    with pytest.raises(AudioError) as e:
        check_path(uri)
    assert e.value.kind == kind and uri in str(e.value)


def test_unreadable_permissions_as_an_ordinary_user(corpus):
    """Root reads everything, so the check runs in a forked child that has become the 'nobody' user."""
    import multiprocessing
    import shutil
    import tempfile

    clip = corpus / "clips" / sorted(os.listdir(corpus / "clips"))[0]
    folder = tempfile.mkdtemp(prefix="krasr-perm-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        secret = os.path.join(folder, "secret.wav")
        shutil.copy(clip, secret)
        os.chmod(secret, 0o200)  # write-only: nobody may read it
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()

        def child() -> None:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                check_path(secret)
                q.put("readable")
            except AudioError as e:
                q.put(e.kind)

        p = ctx.Process(target=child)
        p.start()
        p.join(30)
        assert q.get(timeout=5) == "permission_denied"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
