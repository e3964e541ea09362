"""The output folder without a run: the commit protocol, recovery after a kill, and reading it back."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet  # noqa: F401 - pa.parquet

from krasr_batch.output import (
    OutputLayout,
    PartWriter,
    failures_by_kind,
    list_parts,
    open_output,
    read_text,
    recover,
    warnings_by_kind,
    write_run_json,
)
from krasr_batch.schema import SEGMENTS_SCHEMA, files_schema

EXTRA = [pa.field("speaker", pa.string())]


def seg(fid: str, i: int) -> dict:
    return {**{n: None for n in SEGMENTS_SCHEMA.names}, "file_id": fid, "path": f"/{fid}", "segment_index": i,
            "text": f"{fid}{i}"}


def file_row(fid: str, status: str = "ok", kind: str | None = None) -> dict:
    return {**{n: None for n in files_schema(EXTRA).names}, "file_id": fid, "path": f"/{fid}", "status": status,
            "error_kind": kind, "num_segments": 1, "speaker": "s"}


def test_parts_are_committed_in_pairs_and_read_back(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    w = PartWriter(layout, files_schema(EXTRA))
    assert w.write([], []) == 0  # nothing finished: no empty part
    assert w.write([seg("a", 0)], [file_row("a")]) == 1
    assert w.write([seg("b", 0)], [file_row("b", "error", "not_found")]) == 1
    names = [p.rsplit("/", 1)[1] for p in list_parts(layout.files)]
    assert names == [p.rsplit("/", 1)[1] for p in list_parts(layout.segments)] and len(names) == 2
    out = open_output(layout.out)
    assert out.files_table(["file_id", "speaker", "nope"]).to_pylist() == [
        {"file_id": "a", "speaker": "s"}, {"file_id": "b", "speaker": "s"}]
    assert out.run_info() is None and not out.complete
    write_run_json(layout, {"rtfx": 2.5})
    assert open_output(layout.out).run_info() == {"rtfx": 2.5} and '"rtfx"' in read_text(layout.run_json)


def test_recovery_removes_what_a_killed_run_left_and_reports_the_done_ids(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    w = PartWriter(layout, files_schema(EXTRA))
    w.write([seg("a", 0)], [file_row("a")])
    orphan = tmp_path / "out" / "segments" / "part-dead-000000.parquet"  # killed between the two renames
    orphan.write_bytes((tmp_path / "out" / "segments").joinpath(list_parts(layout.segments)[0].rsplit("/", 1)[1])
                       .read_bytes())
    tmp = tmp_path / "out" / "files" / ".tmp-part-x.parquet.1234"
    tmp.write_bytes(b"half")
    assert len(list_parts(layout.segments)) == 2 and tmp.name not in str(list_parts(layout.files))
    assert recover(layout) == {"a"}
    assert not orphan.exists() and not tmp.exists() and len(list_parts(layout.segments)) == 1


def test_warnings_are_grouped_by_each_ones_kind():
    """A files row's ``warning`` holds its warnings joined by "; "; each is grouped by the words before its
    first colon, so a file with two warnings is in two groups."""
    rows = [dict(file_row("a"), warning="quiet: its loudest moment is at -52.5 dBFS, raised 37.5 dB for ..."),
            dict(file_row("b"), warning="truncated: decoded 3.00 s of the 4.00 s the header declares; "
                                        "nonfinite: 100 NaN/inf samples replaced by silence"),
            file_row("c"), dict(file_row("d"), warning="quiet: its loudest moment is at -40.0 dBFS, raised ...")]
    assert warnings_by_kind(rows) == {"quiet": ["a", "d"], "truncated": ["b"], "nonfinite": ["b"]}
    into = {"quiet": ["z"]}
    warnings_by_kind(rows[:1], into=into)
    assert into == {"quiet": ["z", "a"]}


def test_failures_are_grouped_by_kind_in_order():
    rows = [file_row("a"), file_row("b", "error", "not_found"), file_row("c", "error"),
            file_row("d", "error", "not_found")]
    assert failures_by_kind(rows) == {"not_found": ["b", "d"], "error": ["c"]}
    into = {"not_found": ["z"]}
    failures_by_kind(rows[1:2], into=into)
    assert into == {"not_found": ["z", "b"]}
    assert failures_by_kind(rows, value=lambda r: r["path"]) == {"not_found": ["/b", "/d"], "error": ["/c"]}


def test_words_are_committed_with_their_segments_and_orphans_are_removed(tmp_path):
    from krasr_batch.schema import WORDS_SCHEMA

    layout = OutputLayout(str(tmp_path / "out"))
    w = PartWriter(layout, files_schema(EXTRA), words=True)
    word = {"file_id": "a", "segment_index": 0, "word_index": 0, "word": " a0", "start_s": 0.1, "end_s": 0.4,
            "probability": 0.9}
    assert w.write([seg("a", 0)], [file_row("a")], [word]) == 1
    assert w.write([seg("b", 0)], [file_row("b", "error", "not_found")], []) == 1  # a part with no words
    names = [p.rsplit("/", 1)[1] for p in list_parts(layout.files)]
    assert [p.rsplit("/", 1)[1] for p in list_parts(layout.words)] == names
    out = open_output(layout.out)
    assert out.words_of_part(out.segments_parts[0]) == {("a", 0): [word]}
    assert out.words_of_part(out.segments_parts[1]) == {}
    # a kill after the words part but before the files part: the words part goes, like a segments part
    orphan = tmp_path / "out" / "words" / "part-dead-000000.parquet"
    pa.parquet.write_table(pa.Table.from_pylist([word], schema=WORDS_SCHEMA), orphan)
    assert recover(layout) == {"a", "b"}
    assert not orphan.exists() and len(list_parts(layout.words)) == 2


def test_a_run_is_complete_only_when_every_line_of_its_manifest_is_committed(tmp_path):
    import pytest

    from krasr_batch.manifest import normalize_manifest
    from krasr_batch.pipeline import RunAborted
    from krasr_batch.pipeline.orchestrate import check_committed

    m = tmp_path / "m.jsonl"
    m.write_text("".join(f'{{"path": "{i}.wav"}}\n' for i in range(4, 10)))
    normalized = str(tmp_path / "n.parquet")
    earlier = {f"{i}.wav" for i in range(6)}  # an earlier run's, with another manifest
    summary = normalize_manifest(str(m), normalized, skip_ids=earlier)
    with pytest.raises(RunAborted, match=r"3 of the manifest's 6 files not committed: 7.wav, 8.wav, 9.wav"):
        check_committed(normalized, summary, earlier | {"6.wav"}, "run")
    assert check_committed(normalized, summary, earlier | {f"{i}.wav" for i in range(6, 10)}, "run") == 4


def test_a_part_that_cannot_be_written_names_its_path_and_leaves_no_temporary(tmp_path):
    """A full disk, a quota or a read-only mount while committing: WriteFailed names the part (the CLI's
    'error: cannot write …', exit 1) instead of a traceback, and the half-written temporary file goes."""
    import pytest

    from krasr_batch.storage import WriteFailed

    layout = OutputLayout(str(tmp_path / "out"))
    writer = PartWriter(layout, files_schema(EXTRA))
    blocked = tmp_path / "out" / "segments" / f"part-{writer.run_tag}-000000.parquet"
    (blocked / "in-the-way").mkdir(parents=True)  # a folder where the part's rename must land
    with pytest.raises(WriteFailed, match=rf"cannot write {blocked}: "):
        writer.write([seg("a", 0)], [file_row("a")])
    assert sorted(p.name for p in blocked.parent.iterdir()) == [blocked.name]  # no .tmp- left
    assert list_parts(layout.files) == [] and recover(layout) == set()  # nothing counted as done


def test_drop_failed_takes_out_only_the_asked_failed_files_rows_in_place(tmp_path):
    """--retry-failed: a failed file's rows leave files/ (and its segments/ twin, where it has any) so that
    the run does it again; ok files, and failed ones not asked for (not in this run's manifest), stay."""
    from krasr_batch.output import drop_failed

    layout = OutputLayout(str(tmp_path / "out"))
    w = PartWriter(layout, files_schema(EXTRA))
    w.write([seg("a", 0), seg("b", 0)], [file_row("a"), file_row("b", "error", "internal")])
    w.write([seg("c", 0)], [file_row("c", "error", "not_found"), file_row("d", "error", "not_found")])
    w.write([seg("e", 0)], [file_row("e")])
    names_before = [p.rsplit("/", 1)[1] for p in list_parts(layout.files)]
    assert sorted(drop_failed(layout, {"b", "c", "zz"})) == ["b", "c"]
    assert [p.rsplit("/", 1)[1] for p in list_parts(layout.files)] == names_before  # same parts, rewritten
    out = open_output(layout.out)
    assert sorted(out.files_table(["file_id"]).column(0).to_pylist()) == ["a", "d", "e"]
    assert sorted(r["file_id"] for b in out.segment_batches(["file_id"]) for r in b.to_pylist()) == ["a", "e"]
    assert recover(layout) == {"a", "d", "e"}  # b and c are not done: the next run does them
    assert not list((tmp_path / "out" / "files").glob(".tmp-*"))
    assert drop_failed(layout, set()) == []


def test_the_files_schema_unifies_every_runs_parts(tmp_path):
    """One footer is read per run (its parts share its writer's schema), and every run's columns are there."""
    layout = OutputLayout(str(tmp_path / "out"))
    first = PartWriter(layout, files_schema(EXTRA))
    for fid in ("a", "b", "c"):
        first.write([seg(fid, 0)], [file_row(fid)])
    second = PartWriter(layout, files_schema([pa.field("channel", pa.int64())]))
    row = {**{n: None for n in files_schema([]).names}, "file_id": "d", "path": "/d", "status": "ok", "channel": 2}
    second.write([seg("d", 0)], [row])
    schema = open_output(layout.out).files_schema
    assert schema.field("speaker").type == pa.string() and schema.field("channel").type == pa.int64()
    assert sorted(open_output(layout.out).files_table(["file_id"]).column(0).to_pylist()) == ["a", "b", "c", "d"]
