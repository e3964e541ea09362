"""Where a run's output lies, and the small readings every user of the folder shares: the committed part
files of a table, a text file, and failed files counted by kind."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from krasr_batch.storage import filesystem, join

TMP_PREFIX = ".tmp-"  # hidden (skipped by pyarrow, pandas, Spark) and not ending in .parquet (skipped by globs)
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"


@dataclass
class OutputLayout:
    out: str

    @property
    def segments(self) -> str:
        return join(self.out, "segments")

    @property
    def words(self) -> str:
        return join(self.out, "words")

    @property
    def files(self) -> str:
        return join(self.out, "files")

    @property
    def work(self) -> str:
        return join(self.out, "_work")

    @property
    def run_json(self) -> str:
        return join(self.out, "run.json")

    @property
    def success(self) -> str:
        return join(self.out, "_SUCCESS")


def _file_infos(directory: str) -> list[pafs.FileInfo]:
    fs, p = filesystem(directory)
    try:
        return fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []


def list_parts(directory: str) -> list[str]:
    """The committed part files of one table folder (paths inside its filesystem), sorted; [] when missing.

    Never the hidden ``.tmp-…`` files of a run in progress."""
    return sorted(i.path for i in _file_infos(directory) if i.type == pafs.FileType.File
                  and i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(PART_SUFFIX))


def list_tmp(directory: str) -> list[str]:
    """The temporary files an interrupted writer left in ``directory``."""
    return [i.path for i in _file_infos(directory)
            if i.type == pafs.FileType.File and i.base_name.startswith(TMP_PREFIX)]


def read_text(path: str) -> str | None:
    """A small text file (UTF-8), or None when it is missing or unreadable."""
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None


def warnings_by_kind(rows: Iterable[Mapping[str, Any]], into: dict[str, list] | None = None) -> dict[str, list]:
    """The ``file_id`` of each row with a ``warning``, grouped by each of its warnings' kind (the words before
    the first colon: ``quiet``, ``truncated``, ``nonfinite``, ``corrupt stream``, ``phase``, ``sidecar``; a file
    may be in several)."""
    out: dict[str, list] = into if into is not None else {}
    for r in rows:
        for w in (r.get("warning") or "").split("; "):
            if w:
                out.setdefault(w.split(":", 1)[0].strip(), []).append(r["file_id"])
    return out


def failures_by_kind(rows: Iterable[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], Any] | None = None,
                     into: dict[str, list] | None = None) -> dict[str, list]:
    """Failed files (``status`` other than ``ok``) grouped by ``error_kind`` ("error" when a row has none), in
    the order they come; each group lists ``value(row)`` (default: the ``file_id``). ``into`` adds to a dict."""
    out: dict[str, list] = into if into is not None else {}
    for r in rows:
        if r.get("status") != "ok":
            out.setdefault(r.get("error_kind") or "error", []).append(value(r) if value else r["file_id"])
    return out
