"""How the model stage's blocks are sized: a small job's few segments spread over the replicas."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from krasr_batch.audio import header_duration_s
from krasr_batch.pipeline.orchestrate import small_job_block_rows


def _wav(path, seconds: float, rate: int = 16000, channels: int = 1):
    sf.write(path, np.zeros((int(rate * seconds), channels), np.float32), rate)
    return str(path)


def test_header_duration_reads_headers_and_says_none_where_it_cannot(tmp_path):
    assert abs(header_duration_s(_wav(tmp_path / "a.wav", 5.0)) - 5.0) < 1e-6
    assert abs(header_duration_s(_wav(tmp_path / "b.wav", 3.0, 44100, 2)) - 3.0) < 1e-4
    (tmp_path / "junk.wav").write_bytes(b"RIFF????WAVEjunk")
    assert header_duration_s(str(tmp_path / "junk.wav")) is None
    assert header_duration_s(str(tmp_path / "missing.wav")) is None
    assert header_duration_s("s3://bucket/a.wav") is None
    assert header_duration_s(str(tmp_path / "shard.parquet") + "#row=3") is None


def test_a_few_clips_are_spread_over_the_replicas(tmp_path):
    clips = [_wav(tmp_path / f"c{i}.wav", 5.0) for i in range(3)]
    assert small_job_block_rows(clips, actors=2, rows=16, window_s=30.0) == 2  # blocks of 2 and 1
    assert small_job_block_rows(clips, actors=4, rows=16, window_s=30.0) == 1
    assert small_job_block_rows(clips, actors=1, rows=16, window_s=30.0) == 16  # one replica: nothing to spread


def test_a_few_long_recordings_split_evenly_and_unknown_files_keep_full_blocks(tmp_path):
    longs = [_wav(tmp_path / f"l{i}.wav", 290.0) for i in range(2)]  # 10 windows each
    assert small_job_block_rows(longs, actors=2, rows=16, window_s=30.0) == 10  # 10 + 10, not 16 + 4
    assert small_job_block_rows([*longs, "s3://b/x.wav"], actors=2, rows=16, window_s=30.0) == 16
    many = [_wav(tmp_path / f"m{i}.wav", 1.0) for i in range(40)]
    assert small_job_block_rows(many, actors=2, rows=16, window_s=30.0) == 16
