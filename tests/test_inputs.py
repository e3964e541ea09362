"""Every input shape read into the same manifest entries: folders, CSV/TSV, Parquet, NeMo JSONL, dataset shards.

No Ray and no model: the records, their validation, their one-line errors, and decoding a dataset shard's
audio from memory, compared with decoding the file it was made from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from krasr_batch.audio import AudioError, check_path, load_audio
from krasr_batch.cli import main
from krasr_batch.inputs import input_kind
from krasr_batch.manifest import ManifestError, iter_manifest, normalize_manifest
from krasr_batch.shards import parse_ref

from .conftest import s3_out_of_reach

CLIPS = ["ru_000.wav", "ru_001.flac", "ru_002.ogg", "ru_003.mp3"]


@pytest.fixture()
def tree(tmp_path, corpus) -> Path:
    """A folder of recordings: sidecar texts, a subfolder, a hidden folder, files that are not audio."""
    root = tmp_path / "archive"
    (root / "b" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    shutil.copy(corpus / "clips" / "ru_000.wav", root / "a.wav")
    (root / "a.txt").write_text("  Текст первый.\n", encoding="utf-8")
    shutil.copy(corpus / "clips" / "ru_001.flac", root / "b" / "x.FLAC")
    shutil.copy(corpus / "clips" / "ru_003.mp3", root / "b" / "deeper" / "y.mp3")
    (root / "b" / "deeper" / "y.txt").write_text("екінші мәтін", encoding="utf-8")
    shutil.copy(corpus / "clips" / "ru_002.ogg", root / ".hidden" / "z.ogg")
    (root / "notes.pdf").write_bytes(b"%PDF")
    (root / "c.txt").write_text("a sidecar without its recording", encoding="utf-8")
    return root


def test_a_folder_is_walked_in_order_with_sidecar_texts(tree):
    jobs = list(iter_manifest(str(tree)))
    assert [j.file_id for j in jobs] == ["a.wav", "b/deeper/y.mp3", "b/x.FLAC"]
    assert [j.path for j in jobs] == [str(tree / j.file_id) for j in jobs]
    assert [j.reference_text for j in jobs] == ["Текст первый.", "екінші мәтін", None]
    assert [j.line for j in jobs] == [1, 2, 3]
    assert input_kind(str(tree)) == "folder"


def test_a_sidecar_with_a_byte_order_mark_or_in_cp1251(tree, caplog, monkeypatch):
    (tree / "a.txt").write_bytes("\ufeffТекст первый.\r\n".encode())  # Notepad's UTF-8
    assert next(iter_manifest(str(tree))).reference_text == "Текст первый."
    # a text saved in cp1251 does not stop the job: the file comes without it, with a warning naming it
    (tree / "a.txt").write_bytes("Текст".encode("cp1251"))
    jobs = list(iter_manifest(str(tree)))
    assert [j.file_id for j in jobs] == ["a.wav", "b/deeper/y.mp3", "b/x.FLAC"]
    assert [j.reference_text for j in jobs] == [None, "екінші мәтін", None]
    assert jobs[0].warning == (f"sidecar: {tree / 'a.txt'} is not UTF-8 (invalid continuation byte at byte 1), "
                               "so the file has no reference text (save it as UTF-8: iconv -f cp1251 -t utf-8)")
    assert [j.warning for j in jobs[1:]] == [None, None]
    # the normalized manifest carries the warning on, and the summary counts it
    summary = normalize_manifest(str(tree), str(tree.parent / "m.parquet"))
    assert (summary.num_warned, summary.first_warning) == (1, jobs[0].warning)
    assert pq.read_table(tree.parent / "m.parquet").column("warning").to_pylist() == [jobs[0].warning, None, None]
    # `krasr-batch manifest` leaves the text out and says why on stderr
    r = CliRunner().invoke(main, ["manifest", str(tree)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[0]) == {"id": "a.wav", "path": str(tree / "a.wav"),
                                                    "input_warning": jobs[0].warning}
    assert r.stderr.strip() == f"warning: a.wav: {jobs[0].warning}"
    (tree.parent / "m.jsonl").write_text(r.stdout, encoding="utf-8")  # read again, the warning is the file's still
    assert [j.warning for j in iter_manifest(str(tree.parent / "m.jsonl"))] == [j.warning for j in jobs]
    # `submit`'s copy of the folder has no text for it either but its warning (before, the cluster's rows had
    # none), and submission says so, counted once
    import krasr_batch.inputs as inputs_module
    from krasr_batch.cli.cluster import ship_manifest

    read = []
    real = inputs_module._read_sidecar
    monkeypatch.setattr(inputs_module, "_read_sidecar", lambda fs, path, shown: read.append(path) or real(fs, path, shown))
    ship = tree.parent / "ship"
    ship.mkdir()
    with caplog.at_level(logging.WARNING, logger="krasr_batch.cli.cluster"):
        dest, n, local = ship_manifest(str(tree), str(ship))
    assert (n, local) == (3, 3)
    assert sorted(read) == sorted(str(p) for p in (tree / "a.txt", tree / "b" / "deeper" / "y.txt"))  # each once
    assert json.loads(Path(dest).read_text(encoding="utf-8").splitlines()[0]) == {
        "id": "a.wav", "path": str(tree / "a.wav"), "input_warning": jobs[0].warning}
    assert [j.warning for j in iter_manifest(dest)] == [j.warning for j in jobs]
    assert [r.getMessage() for r in caplog.records] == [
        f"1 file(s) came with a warning, kept in their files/ rows; the first: {jobs[0].warning}"]


def test_glob_narrows_a_folder_and_only_a_folder(tree, corpus):
    assert [j.file_id for j in iter_manifest(str(tree), ["b/*"])] == ["b/deeper/y.mp3", "b/x.FLAC"]
    assert [j.file_id for j in iter_manifest(str(tree), ["*.wav", "*.mp3"])] == ["a.wav", "b/deeper/y.mp3"]
    assert list(iter_manifest(str(tree), ["*.opus"])) == []
    with pytest.raises(ManifestError, match="--glob narrows a folder input"):
        list(iter_manifest(str(corpus / "clips.jsonl"), ["*.wav"]))


def test_manifest_command_writes_what_run_reads(tree, tmp_path):
    r = CliRunner().invoke(main, ["manifest", str(tree)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines()]
    assert lines[0] == {"id": "a.wav", "path": str(tree / "a.wav"), "text": "Текст первый."}
    written = tmp_path / "m.jsonl"
    written.write_text(r.output, encoding="utf-8")
    assert list(iter_manifest(str(written))) == list(iter_manifest(str(tree)))
    bad = CliRunner().invoke(main, ["manifest", str(tmp_path / "none.csv")])
    assert bad.exit_code == 2 and "none.csv: cannot open it" in bad.output


def test_csv_and_tsv_with_a_header(tmp_path, corpus):
    for sep, ext in ((",", "csv"), ("\t", "tsv")):
        f = tmp_path / f"m.{ext}"
        rows = [["path", "id", "language", "text", "speaker"],
                [str(corpus / "clips" / "ru_000.wav"), "one", "russian", "Первый, с запятой.", "s1"],
                ["clips/ru_001.flac", "", "", "", "s2"]]
        import csv

        with open(f, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh, delimiter=sep).writerows(rows)
        jobs = list(iter_manifest(str(f)))
        assert [(j.file_id, j.language, j.reference_text, j.extra, j.line) for j in jobs] == [
            ("one", "russian", "Первый, с запятой.", {"speaker": "s1"}, 2),
            ("clips/ru_001.flac", None, None, {"speaker": "s2"}, 3)]
        assert jobs[1].path == str(tmp_path / "clips" / "ru_001.flac")  # relative to the CSV's folder


def test_csv_errors_are_one_line_naming_the_file(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("file,text\na.wav,x\n", encoding="utf-8")
    with pytest.raises(ManifestError) as e:
        list(iter_manifest(str(f)))
    assert str(e.value) == f"{f}, line 1: no 'path' column (NeMo's 'audio_filepath' also does); columns: file, text"
    f.write_text("path,id\na.wav,x\nb.wav,x\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"line 3: duplicate id 'x' \(first on line 2\)"):
        list(iter_manifest(str(f)))
    f.write_text("path,id\na.wav,x,extra\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="line 2: more fields than the header's 2"):
        list(iter_manifest(str(f)))


def test_a_byte_order_mark_and_crlf_line_ends_are_not_content(tmp_path):
    """Excel's "CSV UTF-8" and PowerShell 5 open a file with a byte-order mark; Windows ends lines with CRLF."""
    plain = {"m.csv": "path,id,text\na.wav,one,Бірінші\nb.wav,two,\n",
             "m.jsonl": '{"path": "a.wav", "id": "one", "text": "Бірінші"}\n\n{"path": "b.wav", "id": "two"}\n'}
    for name, text in plain.items():
        f, marked = tmp_path / name, tmp_path / f"bom-{name}"
        f.write_text(text, encoding="utf-8")
        marked.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
        jobs = [(j.file_id, j.reference_text, j.line, os.path.basename(j.path)) for j in iter_manifest(str(marked))]
        assert jobs == [("one", "Бірінші", 2 if name.endswith("csv") else 1, "a.wav"),
                        ("two", None, 3, "b.wav")], name
        assert jobs == [(j.file_id, j.reference_text, j.line, os.path.basename(j.path))
                        for j in iter_manifest(str(f))]


@pytest.mark.parametrize("name", ["m.jsonl", "m.csv"])
def test_bytes_that_are_not_utf8_are_blamed_on_their_own_line(tmp_path, name):
    """A text stream decodes 8 KB ahead: the error named an earlier line (line 1 for a file of two lines)."""
    row = (lambda i, x: b'{"path": "a.wav", "id": "%s"}\n' % x) if name.endswith("jsonl") else \
        (lambda i, x: b"a.wav,%s\n" % x)
    head = b"" if name.endswith("jsonl") else b"path,id\n"
    rows = [row(i, b"x%d" % i) for i in range(5000)]
    rows[3999] = row(3999, "Ж".encode("cp1251"))  # a Windows-1251 export: one byte, not UTF-8
    f = tmp_path / name
    f.write_bytes(head + b"".join(rows))  # line 4000 (4001 after a header), well past the first chunks read
    line = 4000 + bool(head)
    with pytest.raises(ManifestError, match=rf"{name}, line {line}: not UTF-8 text \(invalid "):
        list(iter_manifest(str(f)))
    f.write_bytes(head + b"".join(rows[:2]) + b"\xff")  # the last line, with no line end
    with pytest.raises(ManifestError, match=rf"line {3 + bool(head)}: not UTF-8 text"):
        list(iter_manifest(str(f)))


def test_a_csv_separated_by_semicolons_is_read_as_excel_wrote_it(tmp_path):
    """Excel in a Russian or Kazakh locale (a comma is the decimal mark there) saves "CSV" with semicolons."""
    f = tmp_path / "m.csv"
    f.write_bytes(b"\xef\xbb\xbf" + 'path;id;text\r\na.wav;one;"Текст, с запятой"\r\nb.wav;two;\r\n'.encode())
    jobs = [(j.file_id, j.reference_text, j.line, os.path.basename(j.path)) for j in iter_manifest(str(f))]
    assert jobs == [("one", "Текст, с запятой", 2, "a.wav"), ("two", None, 3, "b.wav")]
    f.write_text("path,id\na;b.wav,x\n", encoding="utf-8")  # a comma header wins: its path holds a semicolon
    assert [os.path.basename(j.path) for j in iter_manifest(str(f))] == ["a;b.wav"]
    f.write_text("file;text\na.wav;x\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="line 1: no 'path' column .*columns: file;text"):
        list(iter_manifest(str(f)))


def test_parquet_table(tmp_path, corpus):
    f = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["clips/ru_000.wav", str(corpus / "clips" / "ru_001.flac")],
                             "text": ["первый", None], "duration": [3.2, 2.9]}), f)
    jobs = list(iter_manifest(str(f)))
    assert [(j.file_id, j.reference_text, j.extra, j.line) for j in jobs] == [
        ("clips/ru_000.wav", "первый", {"duration": 3.2}, 0), (str(corpus / "clips" / "ru_001.flac"), None, {"duration": 2.9}, 1)]
    pq.write_table(pa.table({"file": ["a.wav"]}), f)
    with pytest.raises(ManifestError) as e:
        list(iter_manifest(str(f)))
    assert str(e.value) == f"{f}: no 'path' column (NeMo's 'audio_filepath' also does); columns: file"


def test_nemo_jsonl(tmp_path, corpus):
    f = tmp_path / "nemo.json"
    f.write_text(json.dumps({"audio_filepath": str(corpus / "clips" / "ru_000.wav"), "text": "первый",
                             "duration": 3.2}) + "\n", encoding="utf-8")
    [job] = iter_manifest(str(f))
    assert (job.file_id, job.path, job.reference_text, job.extra) == (
        str(corpus / "clips" / "ru_000.wav"), str(corpus / "clips" / "ru_000.wav"), "первый", {"duration": 3.2})
    f.write_text(json.dumps({"audio_filepath": "a.wav", "offset": 2.5, "duration": 1.0}) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="line 1: NeMo 'offset'"):
        list(iter_manifest(str(f)))
    f.write_text(json.dumps({"text": "no audio"}) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="line 1: missing required field 'path'"):
        list(iter_manifest(str(f)))


def _shard(path: Path, corpus: Path, names: list[str], with_paths: bool = True, **columns) -> Path:
    """A dataset shard as the `datasets` library writes one: an Audio column holding the files' bytes."""
    from datasets import Audio, Dataset

    audio = [{"bytes": (corpus / "clips" / n).read_bytes(), "path": n if with_paths else None} for n in names]
    ds = Dataset.from_dict({"audio": audio, **columns}).cast_column("audio", Audio())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path


def test_dataset_shards_decode_from_memory_as_the_files_do(tmp_path, corpus):
    shard = _shard(tmp_path / "data" / "test-00000.parquet", corpus, CLIPS, text=["a", "b", "c", "d"],
                   language=["russian"] * 4)
    assert input_kind(str(shard)) == "parquet"
    jobs = list(iter_manifest(str(shard)))
    assert [j.file_id for j in jobs] == CLIPS
    assert [j.reference_text for j in jobs] == ["a", "b", "c", "d"] and {j.language for j in jobs} == {"russian"}
    assert [parse_ref(j.path) for j in jobs] == [(str(shard), i) for i in range(4)]
    for job, name in zip(jobs, CLIPS):
        check_path(job.path)
        assert (load_audio(job.path) == load_audio(str(corpus / "clips" / name))).all()
    with pytest.raises(AudioError) as e:
        check_path(f"{shard}#row=4")
    assert e.value.kind == "not_found" and "has 4 rows, no row 4" in str(e.value)


def test_several_shards_count_rows_across_them_when_the_audio_has_no_path(tmp_path, corpus):
    _shard(tmp_path / "d" / "train-00000.parquet", corpus, CLIPS[:2], with_paths=False, text=["a", "b"])
    _shard(tmp_path / "d" / "train-00001.parquet", corpus, CLIPS[2:], with_paths=False, text=["c", "d"])
    jobs = list(iter_manifest(str(tmp_path / "d" / "train-*.parquet")))
    assert [j.file_id for j in jobs] == ["0", "1", "2", "3"]
    assert [parse_ref(j.path)[1] for j in jobs] == [0, 1, 0, 1]
    normalize_manifest(str(tmp_path / "d" / "train-*.parquet"), str(tmp_path / "n.parquet"))
    assert pq.read_table(tmp_path / "n.parquet").column("file_id").to_pylist() == ["0", "1", "2", "3"]
    with pytest.raises(ManifestError, match="no file matches this pattern"):
        list(iter_manifest(str(tmp_path / "d" / "test-*.parquet")))


def test_a_shard_whose_audio_is_not_a_struct_of_bytes_says_so(tmp_path):
    f = tmp_path / "x.parquet"
    pq.write_table(pa.table({"audio": ["a.wav"], "text": ["t"]}), f)
    with pytest.raises(ManifestError, match="'audio' is not a struct of bytes and path"):
        list(iter_manifest(str(f)))


def test_duplicate_ids_in_a_shard_name_both_rows(tmp_path, corpus):
    shard = _shard(tmp_path / "s.parquet", corpus, ["ru_000.wav", "ru_000.wav"])
    with pytest.raises(ManifestError, match=r"row 1: duplicate id 'ru_000.wav' \(first on row 0\)"):
        list(iter_manifest(str(shard)))


def test_walk_follows_a_symlink_loop_once(tmp_path, corpus):
    root = tmp_path / "loop"
    root.mkdir()
    shutil.copy(corpus / "clips" / "ru_000.wav", root / "a.wav")
    os.symlink(root, root / "again")
    assert [j.file_id for j in iter_manifest(str(root))] == ["a.wav"]


def test_a_dangling_link_is_listed_and_fails_as_not_found(tmp_path, corpus):
    """pyarrow's listing leaves a symbolic link to nothing out; the walk lists it, so it is reported missing."""
    root = tmp_path / "links"
    root.mkdir()
    shutil.copy(corpus / "clips" / "ru_000.wav", root / "a.wav")
    os.symlink(root / "a.wav", root / "b.wav")
    os.symlink(tmp_path / "gone.wav", root / "c.wav")
    os.symlink(tmp_path / "gone.pdf", root / "d.pdf")  # not audio by its name: left out, as files are
    assert [j.file_id for j in iter_manifest(str(root))] == ["a.wav", "b.wav", "c.wav"]
    with pytest.raises(AudioError, match=r"a symbolic link to nothing: .*c\.wav -> .*gone\.wav") as e:
        check_path(str(root / "c.wav"))
    assert e.value.kind == "not_found"


def test_a_name_that_is_not_utf8_is_listed_printable_and_read(tmp_path, corpus):
    """A folder unpacked from a cp1251 zip: a file (or folder) name whose bytes are not UTF-8. Before stop 35
    one such name anywhere in the tree stopped `manifest` and `run` with pyarrow's UnicodeDecodeError; stop 36
    listed it as ``\\xNN`` and failed its row as bad_name (rename it and rerun). Now the file is read under
    that printable id: its audio and its sidecar text, as a file named in UTF-8 is."""
    root = tmp_path / "archive"
    (root / "ok").mkdir(parents=True)
    clip = corpus / "clips" / "ru_000.wav"
    shutil.copy(clip, root / "ok" / "a.wav")
    raw_root = os.fsencode(root)
    os.mkdir(raw_root + b"/\xc1\xe0\xe9")  # "Бай" in cp1251
    shutil.copy(clip, raw_root + b"/\xc1\xe0\xe9/\xc0.wav")
    shutil.copy(clip, raw_root + b"/ok/\xd1.wav")
    (root / "ok" / "b.txt").write_text("x")
    with open(raw_root + b"/ok/\xd1.txt", "w", encoding="utf-8") as f:
        f.write("Привет\n")
    jobs = list(iter_manifest(str(root)))
    assert [j.file_id for j in jobs] == ["ok/a.wav", "ok/\\xd1.wav", "\\xc1\\xe0\\xe9/\\xc0.wav"]
    assert [j.reference_text for j in jobs] == [None, "Привет", None]
    pa.array([j.path for j in jobs])  # printable: Arrow takes them
    want = load_audio(str(clip))
    for j in jobs:
        check_path(j.path)
        np.testing.assert_array_equal(load_audio(j.path), want)
    with pytest.raises(AudioError) as e:  # a path that only looks escaped is missing, as any other
        check_path(str(root / "ok" / "\\xd2.wav"))
    assert e.value.kind == "not_found"
    (root / "ok" / "\\xd1.wav").write_bytes(b"")  # a file really named so is that file, not the escaped one
    with pytest.raises(AudioError) as e:
        check_path(jobs[1].path)
    assert e.value.kind == "empty_file"


def test_an_s3_prefix_is_walked_and_its_shards_read(tmp_path, corpus, monkeypatch):
    """The walk and a shard's bytes over object storage (moto's S3 on 127.0.0.1), as on a local disk."""
    import socket

    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    from krasr_batch import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        storage._filesystem.cache_clear()
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        client.create_bucket(Bucket="krasr-inputs")
        client.upload_file(str(corpus / "clips" / "ru_000.wav"), "krasr-inputs", "in/a.wav")
        client.put_object(Bucket="krasr-inputs", Key="in/a.txt", Body="первый".encode())
        client.upload_file(str(corpus / "clips" / "ru_001.flac"), "krasr-inputs", "in/sub/b.flac")
        client.put_object(Bucket="krasr-inputs", Key="in/sub/notes.md", Body=b"x")
        shard = _shard(tmp_path / "s.parquet", corpus, ["ru_002.ogg"], text=["c"])
        client.upload_file(str(shard), "krasr-inputs", "shards/test-00000.parquet")

        jobs = list(iter_manifest("s3://krasr-inputs/in/"))
        assert [(j.file_id, j.path, j.reference_text) for j in jobs] == [
            ("a.wav", "s3://krasr-inputs/in/a.wav", "первый"), ("sub/b.flac", "s3://krasr-inputs/in/sub/b.flac", None)]
        assert [j.file_id for j in iter_manifest("s3://krasr-inputs/in", ["sub/*"])] == ["sub/b.flac"]
        [job] = iter_manifest("s3://krasr-inputs/shards/test-*.parquet")
        assert job.path == "s3://krasr-inputs/shards/test-00000.parquet#row=0" and job.reference_text == "c"
        # one recording, and a pattern of them (its NAME.txt the sidecar, not an input)
        assert [(j.file_id, j.path, j.reference_text) for j in iter_manifest("s3://krasr-inputs/in/a.wav")] == [
            ("a.wav", "s3://krasr-inputs/in/a.wav", "первый")]
        assert [(j.file_id, j.reference_text) for j in iter_manifest("s3://krasr-inputs/in/*")] == [("a.wav", "первый")]
        with pytest.raises(ManifestError, match=r"^s3://krasr-inputs/in/c\.wav: no such file$"):
            list(iter_manifest("s3://krasr-inputs/in/c.wav"))
        check_path(job.path)
        assert (load_audio(job.path) == load_audio(str(corpus / "clips" / "ru_002.ogg"))).all()
    finally:
        server.stop()
        storage._filesystem.cache_clear()


def test_a_spreadsheets_header_names_our_columns_in_any_case_and_spacing(tmp_path):
    """'Path,Text' (a spreadsheet's header) was 'no path column'; 'path, text' carried ' text' as an extra
    field and the reference was lost to eval. Our column names are matched stripped and in any case."""
    import pandas as pd

    (tmp_path / "a.csv").write_text("\ufeffSpeaker, TEXT ,Language,Path\ns1, hello,ru, a.wav\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text("path,Path\na.wav,other\n", encoding="utf-8")  # ours, exactly, wins
    pd.DataFrame({"Path": ["c.wav"], "ID": ["c1"], "Text": ["hi"], "n": [1]}).to_parquet(tmp_path / "c.parquet")
    (a,) = iter_manifest(str(tmp_path / "a.csv"))
    assert (a.path, a.reference_text, a.language, a.extra) == (str(tmp_path / "a.wav"), "hello", "ru", {"Speaker": "s1"})
    (b,) = iter_manifest(str(tmp_path / "b.csv"))
    assert b.path == str(tmp_path / "a.wav") and b.extra == {"manifest_Path": "other"}
    (c,) = iter_manifest(str(tmp_path / "c.parquet"))
    assert (c.file_id, c.path, c.reference_text, c.extra) == ("c1", str(tmp_path / "c.wav"), "hi", {"n": 1})


def test_a_manifest_piped_on_standard_input(tmp_path, corpus):
    """`krasr-batch manifest archive/ | jq ... | krasr-batch run - ...`: '-' is standard input (JSON Lines or
    paths, relative paths from the current folder), named <stdin> in errors; submit, which ships a file, says so."""
    import subprocess
    import sys

    from .conftest import REPO

    clip = corpus / "clips" / "ru_000.wav"
    shutil.copy(clip, tmp_path / "a.wav")
    lines = json.dumps({"path": "a.wav", "text": "x"}) + "\n" + json.dumps({"id": "b", "path": str(clip)}) + "\n"
    r = subprocess.run([sys.executable, "-m", "krasr_batch", "manifest", "-"], input=lines, capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in r.stdout.splitlines()] == [
        {"id": "a.wav", "path": str(tmp_path / "a.wav"), "text": "x"}, {"id": "b", "path": str(clip)}]
    r = subprocess.run([sys.executable, "-m", "krasr_batch", "manifest", "-"], input='{"path": "a.wav"}\n[1]\n',
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "error: <stdin>, line 2: expected a JSON object, got list" in r.stderr
    # `find . -name '*.wav' | krasr-batch run - ...`: paths, one a line
    r = subprocess.run([sys.executable, "-m", "krasr_batch", "manifest", "-"], input=f"./a.wav\n{clip}\n",
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in r.stdout.splitlines()] == [
        {"id": "./a.wav", "path": str(tmp_path / "a.wav")}, {"id": str(clip), "path": str(clip)}]
    r = subprocess.run([sys.executable, "-m", "krasr_batch", "submit", "-", "--out", str(tmp_path / "o"),
                        "--address", "http://127.0.0.1:9"], input=lines, capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "takes a file, not standard input" in r.stderr, r.stderr


def test_a_list_of_paths_one_a_line(tmp_path, corpus):
    """`find archive -name '*.wav' > files.txt`: a file that is not JSON Lines by its extension, and whose first
    line that is not blank opens no object, is a list of paths (relative to its folder; spaces around a path
    and blank lines are not entries). One whose first line opens an object is JSON Lines; a .jsonl file is
    JSON Lines whatever it holds. Before, each of the first two was 'not valid JSON' on line 1."""
    shutil.copy(corpus / "clips" / "ru_000.wav", tmp_path / "a.wav")
    (tmp_path / "sub").mkdir()
    shutil.copy(corpus / "clips" / "ru_001.flac", tmp_path / "sub" / "b b.flac")
    for name in ("files.txt", "files", "files.lst"):
        (tmp_path / name).write_text(f"\n  a.wav \r\nsub/b b.flac\n\n{corpus / 'clips' / 'ru_002.ogg'}", encoding="utf-8")
        assert input_kind(str(tmp_path / name)) == "lines"
        jobs = list(iter_manifest(str(tmp_path / name)))
        assert [(j.file_id, j.path, j.line) for j in jobs] == [
            ("a.wav", str(tmp_path / "a.wav"), 2), ("sub/b b.flac", str(tmp_path / "sub" / "b b.flac"), 3),
            (str(corpus / "clips" / "ru_002.ogg"), str(corpus / "clips" / "ru_002.ogg"), 5)]
        assert all(j.reference_text is None and j.language is None for j in jobs)
    (tmp_path / "j.txt").write_text('\n{"path": "a.wav", "text": "x"}\n', encoding="utf-8")
    [job] = iter_manifest(str(tmp_path / "j.txt"))
    assert (job.path, job.reference_text) == (str(tmp_path / "a.wav"), "x")
    (tmp_path / "j.jsonl").write_text("a.wav\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"j\.jsonl, line 1: not valid JSON"):
        list(iter_manifest(str(tmp_path / "j.jsonl")))
    (tmp_path / "twice.txt").write_text("a.wav\nsub/../a.wav\na.wav\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"twice\.txt, line 3: duplicate id 'a\.wav' \(first on line 1\)"):
        list(iter_manifest(str(tmp_path / "twice.txt")))


def test_a_compressed_text_input_reads_as_the_plain_one(tmp_path):
    """`manifest.jsonl.gz` (a million-line manifest is a few hundred MB plain), `files.txt.zst`, `m.csv.bz2`:
    read through the codec named by the last extension, the entries the plain file's; a file that is not what
    its name says is one line naming it. `submit` ships such a manifest as a plain copy, and a manifest with a
    byte-order mark as validation read it (before, its copy failed on the mark: json's 'Unexpected UTF-8 BOM')."""
    import bz2
    import gzip

    import pyarrow as pa

    from krasr_batch.cli.cluster import ship_manifest

    jsonl = "\ufeff" + json.dumps({"path": "a.wav", "text": "Сәлем"}, ensure_ascii=False) + "\n\n" + \
        json.dumps({"path": "b.wav", "id": "b"}) + "\n"
    (tmp_path / "m.jsonl").write_text(jsonl, encoding="utf-8")
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (tmp_path / "m.csv").write_text("path,text\na.wav,Сәлем\n", encoding="utf-8")
    (tmp_path / "m.csv.bz2").write_bytes(bz2.compress((tmp_path / "m.csv").read_bytes()))
    (tmp_path / "f.txt").write_text("a.wav\nb.wav\n", encoding="utf-8")
    with pa.CompressedOutputStream(str(tmp_path / "f.txt.zst"), "zstd") as f:
        f.write((tmp_path / "f.txt").read_bytes())
    for name, kind in (("m.jsonl", "jsonl"), ("m.csv", "csv"), ("f.txt", "lines")):
        plain = [(j.file_id, j.path, j.reference_text, j.line) for j in iter_manifest(str(tmp_path / name))]
        packed = next(tmp_path.glob(f"{name}.*"))
        assert input_kind(str(packed)) == kind
        assert [(j.file_id, j.path, j.reference_text, j.line) for j in iter_manifest(str(packed))] == plain
    (tmp_path / "bad.jsonl.gz").write_bytes(b'{"path": "a.wav"}\n')  # plain text under a .gz name
    with pytest.raises(ManifestError, match=r"bad\.jsonl\.gz, line 1: cannot read it as gzip: "):
        list(iter_manifest(str(tmp_path / "bad.jsonl.gz")))

    for name in ("m.jsonl", "m.jsonl.gz"):
        ship = tmp_path / f"ship-{name}"
        ship.mkdir()
        dest, n, local = ship_manifest(str(tmp_path / name), str(ship))
        assert (dest, n, local) == (str(ship / "m.jsonl"), 2, 2)
        assert (ship / "m.jsonl").read_text(encoding="utf-8").splitlines() == [
            json.dumps({"path": str(tmp_path / "a.wav"), "text": "Сәлем", "id": "a.wav"}, ensure_ascii=False), "",
            json.dumps({"path": str(tmp_path / "b.wav"), "id": "b"})]


def test_one_recording_or_a_pattern_of_them(tmp_path, corpus):
    """`krasr-batch run interview.mp3` and `krasr-batch run 'calls/*/*.wav'`: a recording is a manifest of one
    entry, its id its name and its sidecar its text, as in a folder; a pattern's entries have their paths from
    the pattern's folder as ids, so that two days' x.wav are two files, and a NAME.txt the pattern matches beside
    a NAME.wav it matches is that file's text, not a list of paths. Before, a recording was read as JSON Lines:
    'not UTF-8 text ... (Excel: "CSV UTF-8")'."""
    calls = tmp_path / "calls"
    for day, clip in (("mon", "ru_000.wav"), ("tue", "ru_003.mp3")):
        (calls / day).mkdir(parents=True)
        shutil.copy(corpus / "clips" / clip, calls / day / f"x{os.path.splitext(clip)[1]}")
    (calls / "mon" / "x.txt").write_text("Текст.\n", encoding="utf-8")
    one = calls / "mon" / "x.wav"
    assert input_kind(str(one)) == "media"
    [job] = iter_manifest(str(one))
    assert (job.file_id, job.path, job.reference_text, job.line) == ("x.wav", str(one), "Текст.", 1)
    (calls / "mon" / "x.md").write_text("notes, no input", encoding="utf-8")
    jobs = list(iter_manifest(str(calls / "*" / "x.*")))
    assert [(j.file_id, j.path, j.reference_text) for j in jobs] == [
        ("mon/x.wav", str(one), "Текст."), ("tue/x.mp3", str(calls / "tue" / "x.mp3"), None)]
    (calls / "mon" / "x.txt").write_bytes("Текст".encode("cp1251"))  # as in a folder: a warning, no text
    [job] = iter_manifest(str(one))
    assert job.reference_text is None and job.warning.startswith(f"sidecar: {calls / 'mon' / 'x.txt'} is not UTF-8")
    with pytest.raises(ManifestError, match=r"y\.wav: no such file$"):
        list(iter_manifest(str(calls / "mon" / "y.wav")))
    (calls / "tue" / "late").mkdir()
    shutil.copy(one, calls / "tue" / "late" / "z.wav")
    assert [j.file_id for j in iter_manifest(str(calls / "**" / "*.wav"))] == ["mon/x.wav", "tue/late/z.wav"]
    shutil.copy(one, calls / "tue" / "x.wav")  # wildcards in the last part only: ids are names
    assert [j.file_id for j in iter_manifest(str(calls / "tue" / "x.*"))] == ["x.mp3", "x.wav"]


@pytest.mark.parametrize("source", ["s3://archive/calls/", "s3://archive/calls/*.wav"])
def test_object_storage_out_of_reach_is_one_line_naming_the_input(source, monkeypatch):
    """A folder or pattern on object storage that cannot be reached (its endpoint a closed local port): the
    manifest error naming it, as for a file that cannot be opened, not pyarrow's traceback."""
    from krasr_batch import storage

    s3_out_of_reach(monkeypatch)
    storage._filesystem.cache_clear()
    try:
        with pytest.raises(ManifestError, match=rf"^{source.replace('*', '[*]')}: cannot list it: "):
            list(iter_manifest(source))
    finally:
        storage._filesystem.cache_clear()
