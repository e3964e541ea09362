import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from krasr_batch.manifest import ManifestError, iter_manifest, normalize_manifest

from .conftest import run_cli


def write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_defaults_and_relative_paths(tmp_path):
    m = write(tmp_path, [
        json.dumps({"path": "a/x.wav"}),
        "",
        json.dumps({"path": "/abs/y.flac", "id": "y", "language": "russian", "text": "Привет", "speaker": 7}),
        json.dumps({"path": "s3://bucket/z.mp3", "id": 12}),
    ])
    jobs = list(iter_manifest(str(m)))
    assert [j.file_id for j in jobs] == ["a/x.wav", "y", "12"]
    assert jobs[0].path == str(tmp_path / "a" / "x.wav")
    assert jobs[0].language is None and jobs[0].reference_text is None
    assert jobs[1].path == "/abs/y.flac" and jobs[1].language == "russian" and jobs[1].reference_text == "Привет"
    assert jobs[1].extra == {"speaker": 7}
    assert jobs[2].path == "s3://bucket/z.mp3"
    assert [j.line for j in jobs] == [1, 3, 4]


@pytest.mark.parametrize("lines, line, words", [
    (['{"path": "a.wav"}', '{"path": "b.wav"'], 2, "not valid JSON"),
    (['{"path": "a.wav"}', '["a.wav"]'], 2, "expected a JSON object"),
    (['{"id": "x"}'], 1, "missing required field 'path'"),
    (['{"path": ""}'], 1, "'path' must be a non-empty string"),
    (['{"path": 3}'], 1, "'path' must be a non-empty string"),
    (['{"path": "a.wav", "id": "k"}', '{"path": "b.wav"}', '{"path": "c.wav", "id": "k"}'], 3, "duplicate id 'k' (first on line 1)"),
    (['{"path": "a.wav"}', '{"path": "a.wav"}'], 2, "duplicate id 'a.wav'"),
    (['{"path": "a.wav", "text": 5}'], 1, "'text' must be a string"),
])
def test_bad_lines_name_the_line(tmp_path, lines, line, words):
    m = write(tmp_path, lines)
    with pytest.raises(ManifestError) as e:
        list(iter_manifest(str(m)))
    assert e.value.line == line
    assert f"line {line}" in str(e.value) and words in str(e.value)
    assert str(m) in str(e.value)


def test_fields_named_like_our_columns_are_prefixed(tmp_path):
    m = write(tmp_path, [json.dumps({"path": "a.wav", "duration_s": 3.5, "status": "new"})])
    (job,) = iter_manifest(str(m))
    assert job.extra == {"manifest_duration_s": 3.5, "manifest_status": "new"}


def test_every_files_column_is_protected_whatever_its_case(tmp_path):
    """'segment_wall_s' and 'language_s' were missing from the hand-kept list: such a manifest field made the
    files/ parts hold the name twice, the run failed at its end and no reader could open the folder
    ('Can't unify schema with duplicate field names'). 'Text' beside 'text' is the same column to Spark and
    DuckDB."""
    from krasr_batch.schema import FILES_BASE_SCHEMA, files_schema

    m = write(tmp_path, [json.dumps({"path": "a.wav", "segment_wall_s": 3, "language_s": 1, "Text": "x", "Who": 1})])
    (job,) = iter_manifest(str(m))
    assert job.extra == {"manifest_segment_wall_s": 3, "manifest_language_s": 1, "manifest_Text": "x", "Who": 1}
    summary = normalize_manifest(str(m), str(tmp_path / "n.parquet"))
    names = [n.lower() for n in files_schema(summary.extra_schema()).names]
    assert len(names) == len(set(names)) == len(FILES_BASE_SCHEMA) + 4


def test_normalize_types_extra_fields(tmp_path):
    m = write(tmp_path, [
        json.dumps({"path": "a.wav", "n": 1, "f": 1, "b": True, "s": "x", "mix": 1, "obj": {"k": 1}}),
        json.dumps({"path": "b.wav", "n": 2, "f": 2.5, "b": False, "s": None, "mix": "two"}),
    ])
    summary = normalize_manifest(str(m), str(tmp_path / "n.parquet"))
    assert summary.num_files == 2
    assert summary.extra_types == {"b": pa.bool_(), "f": pa.float64(), "mix": pa.string(), "n": pa.int64(),
                                   "obj": pa.string(), "s": pa.string()}
    t = pq.read_table(tmp_path / "n.parquet")
    assert t.column("file_id").to_pylist() == ["a.wav", "b.wav"]


def test_normalize_skips_done_ids_but_counts_them(tmp_path):
    m = write(tmp_path, [json.dumps({"path": f"{i}.wav"}) for i in range(5)])
    summary = normalize_manifest(str(m), str(tmp_path / "n.parquet"), skip_ids={"1.wav", "3.wav"})
    assert summary.num_files == 5
    assert pq.read_table(tmp_path / "n.parquet").column("file_id").to_pylist() == ["0.wav", "2.wav", "4.wav"]


def test_skipped_counts_only_this_manifests_lines(tmp_path):
    """The done ids of an earlier run with another manifest: only those on this manifest's lines are skipped
    (counting all of them made a rerun with 4 new files out of 6 skip everything and exit 0)."""
    m = write(tmp_path, [json.dumps({"path": f"{i}.wav"}) for i in range(4, 10)])
    done = {f"{i}.wav" for i in range(6)}
    summary = normalize_manifest(str(m), str(tmp_path / "n.parquet"), skip_ids=done)
    assert (summary.num_files, summary.num_skipped) == (6, 2)
    assert pq.read_table(tmp_path / "n.parquet").column("file_id").to_pylist() == [f"{i}.wav" for i in range(6, 10)]


def test_empty_manifest_is_an_error(tmp_path):
    m = write(tmp_path, [""])
    with pytest.raises(ManifestError, match="no entries"):
        normalize_manifest(str(m), str(tmp_path / "n.parquet"))


def test_large_manifest_streams(tmp_path):
    n = 200_000
    p = tmp_path / "big.jsonl"
    with open(p, "w") as f:
        for i in range(n):
            f.write(f'{{"path": "audio/{i:07d}.flac", "speaker": {i % 97}}}\n')
    summary = normalize_manifest(str(p), str(tmp_path / "n.parquet"))
    assert summary.num_files == n
    assert pq.ParquetFile(tmp_path / "n.parquet").metadata.num_rows == n


def test_a_language_that_whisper_or_the_model_does_not_know_names_its_line(tmp_path):
    """Such a line used to stop the whole run at its first batch (a replica's ValueError, through Ray)."""
    good = ['{"path": "a.wav", "language": "Kazakh"}', '{"path": "b.wav", "language": "auto"}',
            '{"path": "c.wav", "language": "<|ru|>"}']
    m = write(tmp_path, [*good, '{"path": "d.wav", "language": "klingon"}'])
    with pytest.raises(ManifestError, match=r"line 4: 'language': Whisper knows no language 'klingon'"):
        list(iter_manifest(str(m)))
    m = write(tmp_path, [*good, '{"path": "d.wav", "language": "cantonese"}'])  # large-v3's 100th language
    assert [j.language for j in iter_manifest(str(m))] == ["Kazakh", "auto", "<|ru|>", "cantonese"]
    with pytest.raises(ManifestError, match=r"line 4: 'language': the model has no language token for 'cantonese'"):
        list(iter_manifest(str(m), model_languages=frozenset({"kk", "ru"})))


def test_the_model_languages_the_driver_reads_from_its_folder(tiny_model, tmp_path):
    from krasr_batch.engines import check_model
    from krasr_batch.engines.base import model_languages
    from krasr_batch.settings import DecodeOptions

    codes = model_languages(str(tiny_model))
    assert len(codes) == 99 and {"kk", "ru", "en"} <= codes and "yue" not in codes
    assert check_model(DecodeOptions(model=str(tiny_model), engine="torch")) == codes
    assert model_languages(str(tmp_path)) is None and model_languages("KRASR/not-here") is None


def test_the_run_language_must_be_one_whisper_knows():
    from krasr_batch.settings import DecodeOptions

    assert DecodeOptions(language="Russian").language == "Russian"
    assert DecodeOptions(language="auto").language == "auto"
    # every spelling of auto is the one the engines test for (" AUTO" was refused: 'no language token')
    assert DecodeOptions(language=" AUTO").language == "auto"
    with pytest.raises(ValueError, match="language: Whisper knows no language 'kazak'"):
        DecodeOptions(language="kazak")


@pytest.mark.e2e
def test_cli_reports_bad_manifest_without_traceback(tmp_path, tiny_model):
    m = write(tmp_path, ['{"path": "a.wav"}', '{"path": "a.wav"}'])
    r = run_cli(["run", str(m), "--out", str(tmp_path / "out"), "--model", str(tiny_model)])
    assert r.returncode == 2
    assert f"{m}, line 2: duplicate id 'a.wav' (first on line 1)" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "files").exists()
    # Whisper knows Cantonese (large-v3), whisper-small's 99 languages do not: the driver's model check says so
    m = write(tmp_path, ['{"path": "a.wav"}', '{"path": "b.wav", "language": "yue"}'])
    r = run_cli(["run", str(m), "--out", str(tmp_path / "out"), "--model", str(tiny_model)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{m}, line 2: 'language': the model has no language token for 'yue'" in r.stderr
    r = run_cli(["run", str(m), "--out", str(tmp_path / "out"), "--model", str(tiny_model), "--language", "yue"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--language yue: the model" in r.stderr and "has no language token for it" in r.stderr


def test_a_rerun_writes_extra_fields_under_the_types_the_output_has(tmp_path):
    """A second manifest into the same --out: its fields take the earlier run's column types where their
    values fit (the folder stays one table for pyarrow, pandas, DuckDB and Spark), else exit 2 naming the
    line. Before: 'speaker' as text, then as numbers, stopped the second run at its end with pyarrow's
    'Unable to merge: Field speaker has incompatible types: string vs int64', and inspect with it."""
    existing = pa.schema([("file_id", pa.string()), ("speaker", pa.string()), ("channel", pa.int64()),
                          ("gain", pa.float64())])
    m = write(tmp_path, [json.dumps({"path": "a.wav", "speaker": 5, "channel": 2, "gain": 3, "new": 1}),
                         json.dumps({"path": "b.wav", "speaker": None, "channel": None, "gain": 0.5})])
    summary = normalize_manifest(str(m), str(tmp_path / "n.parquet"))
    assert summary.extra_types["speaker"] == pa.int64() and summary.extra_types["gain"] == pa.float64()
    summary.adopt(existing, str(m))
    assert summary.extra_types == {"channel": pa.int64(), "gain": pa.float64(), "new": pa.int64(),
                                   "speaker": pa.string()}
    m2 = write(tmp_path, [json.dumps({"path": "c.wav", "channel": 2}), json.dumps({"path": "d.wav", "channel": "L"})])
    summary = normalize_manifest(str(m2), str(tmp_path / "n.parquet"))
    with pytest.raises(ManifestError, match=r", line 2: field 'channel' holds text here, but the output's files/ "
                                            r"table holds it as int64"):
        summary.adopt(existing, str(m2))
