"""The output folder, in one place: where everything lies (``layout``), how a run writes it (``writer``, with
the commit protocol) and how it is read back (``reader``, which ``eval``, ``inspect`` and ``export`` use).

    out/segments/part-*.parquet   one row per segment (schema.SEGMENTS_SCHEMA)
    out/files/part-*.parquet      one row per manifest line (schema.files_schema)
    out/run.json, out/_SUCCESS    written last
    out/_work/                    the normalized manifest and the settings stamp
    out/.krasr-batch.lock         the claim of the run writing it (``claim``): one writer at a time
"""

from krasr_batch.output.claim import OutputBusy, claim_output
from krasr_batch.output.layout import OutputLayout, failures_by_kind, list_parts, read_text, warnings_by_kind
from krasr_batch.output.reader import OutputError, RunOutput, open_output
from krasr_batch.output.writer import (
    PartWriter,
    clear_output,
    drop_failed,
    mark_success,
    recover,
    unmark_success,
    write_bytes_atomic,
    write_run_json,
)

__all__ = [
    "OutputBusy", "claim_output",
    "OutputLayout", "failures_by_kind", "warnings_by_kind", "list_parts", "read_text", "OutputError", "RunOutput", "open_output",
    "PartWriter", "clear_output", "drop_failed", "mark_success", "recover", "unmark_success", "write_bytes_atomic", "write_run_json",
]
