"""``krasr-batch eval``, ``inspect`` and ``export``: reading a finished run's output.

Each takes OUT_DIR, a run's ``--out`` (local path or ``s3://``/``gs://`` URI), and reads it through
:mod:`krasr_batch.output.reader`. A missing folder, or one without committed ``files/`` parts, is a usage
error (exit status 2) with a one-line message; so is a bad ``--by`` or ``--refs``.
"""

from __future__ import annotations

import json

import click

from krasr_batch.cli.common import BadUsage, RunFailed
from krasr_batch.output.reader import OutputError, RunOutput, open_output

OUT_DIR = click.argument("out_dir", metavar="OUT_DIR")


def _open(out_dir: str) -> RunOutput:
    try:
        return open_output(out_dir)
    except OutputError as e:
        raise BadUsage(str(e)) from None
    except OSError as e:  # object storage unreachable, no permission, ...
        raise RunFailed(f"cannot read {out_dir}: {e}") from None


def _resolve_by(output: RunOutput, by: str | None) -> str | None:
    """--by: default ``category`` when that column exists, ``none`` for no grouping."""
    columns = output.files_columns
    if by is None:
        return "category" if "category" in columns else None
    if by.lower() == "none":
        return None
    if by not in columns:
        raise BadUsage(f"--by: no column {by!r} in files/; columns: {', '.join(columns)}")
    return by


@click.command("eval")
@OUT_DIR
@click.option("--refs", "refs_path", metavar="MANIFEST",
              help="JSON Lines with id (default: path) and text; used instead of files/ reference_text.")
@click.option("--by", help="files/ column to group by, or 'none'. [default: category, when it exists]")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def eval_command(out_dir: str, refs_path: str | None, by: str | None, fmt: str) -> None:
    """Error rates (WER, CER, MER, WIL, edits) of OUT_DIR's transcripts against their references.

    Both texts are normalised (lowercase, punctuation removed, whitespace collapsed; Kazakh letters kept).
    Rates are corpus-level. Failed files count as empty transcripts; files without a reference are skipped.
    """
    from krasr_batch.evaluate import RefsError, evaluate, format_csv, format_json, format_table, load_refs

    output = _open(out_dir)
    group_by = _resolve_by(output, by)
    refs = None
    if refs_path:
        try:
            refs = load_refs(refs_path)
        except RefsError as e:
            raise BadUsage(f"--refs: {e}") from None
    report = evaluate(output, group_by, refs)
    text = {"table": format_table, "json": format_json, "csv": format_csv}[fmt](report)
    click.echo(text.rstrip("\n"))
    notes = [f"scored {report.overall.files} files, skipped {report.skipped} without a reference"]
    if report.unmatched_refs:
        notes.append(f"{report.unmatched_refs} references have no file in {out_dir}")
    for note in notes:
        click.echo(note, err=fmt != "table")


@click.command("inspect")
@OUT_DIR
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def inspect_command(out_dir: str, fmt: str) -> None:
    """What a run produced: files ok and failed (by cause), hours, segments, RTFx, per-worker throughput."""
    from krasr_batch.report import format_inspect, inspect_run

    report = inspect_run(_open(out_dir))
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str))
    else:
        click.echo(format_inspect(report))


@click.command("export")
@OUT_DIR
@click.option("--format", "fmt", type=click.Choice(["srt", "vtt", "txt", "jsonl", "dataset"]), required=True,
              help="srt, vtt, txt, jsonl: one file per source file. dataset: the segments as Hugging Face "
                   "dataset Parquet shards (FLAC audio, text, timing, quality signals) for training.")
@click.option("--to", "to", metavar="DIR", help="Output folder. [default: OUT_DIR/export/<format>/]")
@click.option("--where", metavar="SQL",
              help="With --format dataset: only segments this DuckDB expression selects, over the segment's "
                   "columns and its file's (e.g. \"not suspect and avg_logprob > -0.6\").")
def export_command(out_dir: str, fmt: str, to: str | None, where: str | None) -> None:
    """One subtitle or text file per ok source file, named after its id, from the segment timings; or, with
    --format dataset, the segments with their audio as a training dataset."""
    output = _open(out_dir)
    if fmt == "dataset":
        from krasr_batch.export_dataset import ExportError, export_dataset

        try:
            result = export_dataset(output, to, where)
        except ExportError as e:
            raise BadUsage(str(e)) from None
        except OSError as e:
            raise RunFailed(f"cannot write the export: {e}") from None
        skipped = f"; {result.failed_files} source files could not be decoded again" if result.failed_files else ""
        click.echo(f"exported {result.segments} segments of {result.files} files in {len(result.shards)} "
                   f"shards to {result.directory}{skipped}")
        return
    if where:
        raise BadUsage("--where selects segments for --format dataset only")
    from krasr_batch.export import export

    try:
        result = export(output, fmt, to)
    except OSError as e:
        raise RunFailed(f"cannot write the export: {e}") from None
    click.echo(f"exported {result.files} files ({result.cues} cues) to {result.directory}")
    if fmt in ("srt", "vtt") and result.cues and not output.words_parts:
        click.echo("note: this run has no word times, so each cue is a whole segment (up to 30 s of speech); "
                   "a run with --word-timestamps gives cues of subtitle size (two lines, 7 s at most)", err=True)
