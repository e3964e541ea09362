"""``krasr-batch eval``: error rates of a run's transcripts against reference texts.

Both sides are normalised with :func:`krasr_batch.textnorm.normalize` (lowercase, punctuation removed,
whitespace normalised; Kazakh letters and Russian words kept) and aligned with jiwer
(``process_words``, ``process_characters``; characters include the single spaces between words, as
jiwer counts them). Rates are corpus-level: the edits of all files summed over the reference words
(or characters) of all files, not a mean of per-file rates, which is what jiwer gives for a list of pairs.

Conventions:

- a file with ``status=error`` is scored as an empty hypothesis (all its reference words are deletions);
- a file without a reference (null ``reference_text``, or an id absent from ``--refs``) is skipped and
  counted as skipped;
- an empty reference (empty, or nothing left after normalisation) counts every hypothesis word (and
  character) as an insertion; we handle it ourselves, as some jiwer versions raise on empty references;
- a rate whose denominator is zero uses 1 instead (jiwer 4's convention): with no reference words at all,
  ``wer`` is the number of inserted words, ``mer`` and ``wil`` are 1 when something was inserted and 0
  when both sides are empty; ``hyp_ref_ratio`` is hypothesis words over reference words, the same way;
- ``hallucination_like`` counts scored files holding at least one suspect segment (the ``suspect`` column
  of ``segments/`` where present, else :func:`krasr_batch.quality.suspect` of text and duration).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import jiwer

from krasr_batch.inputs import ManifestError, text_lines
from krasr_batch.output.reader import RunOutput, suspect_file_ids
from krasr_batch.textnorm import normalize

log = logging.getLogger(__name__)

MISSING_GROUP = "(missing)"
METRIC_KEYS = ("wer", "cer", "mer", "wil", "substitutions", "deletions", "insertions", "hyp_ref_ratio",
               "hallucination_like", "files")


class RefsError(ValueError):
    """A ``--refs`` manifest line that cannot be used; names the file and line."""


@dataclass(frozen=True)
class EditCounts:
    """Alignment counts of one level (words or characters): hits and the three kinds of edit."""

    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(self.hits + other.hits, self.substitutions + other.substitutions,
                          self.deletions + other.deletions, self.insertions + other.insertions)

    @property
    def ref_len(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def hyp_len(self) -> int:
        return self.hits + self.substitutions + self.insertions

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def error_rate(self) -> float:
        """(S + D + I) / N, N the reference length (1 when it is 0)."""
        return self.edits / max(self.ref_len, 1)

    @property
    def match_error_rate(self) -> float:
        """(S + D + I) / (H + S + D + I), 0 when both sides are empty."""
        return self.edits / max(self.hits + self.edits, 1)

    @property
    def information_lost(self) -> float:
        """1 - H/N * H/P (N reference, P hypothesis length); 1 when one side is empty, 0 when both are."""
        if self.ref_len == 0 and self.hyp_len == 0:
            return 0.0
        if self.ref_len == 0 or self.hyp_len == 0:
            return 1.0
        return 1.0 - (self.hits / self.ref_len) * (self.hits / self.hyp_len)


@dataclass(frozen=True)
class PairScore:
    """One file's word and character alignment counts."""

    words: EditCounts
    chars: EditCounts


@dataclass(frozen=True)
class Metrics:
    """Corpus-level figures for a set of files (the keys of ``eval --format json``)."""

    wer: float
    cer: float
    mer: float
    wil: float
    substitutions: int
    deletions: int
    insertions: int
    hyp_ref_ratio: float
    hallucination_like: int
    files: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    """Overall figures, figures by group, and what was left out."""

    overall: Metrics
    groups: dict[str, Metrics] = field(default_factory=dict)
    by: str | None = None
    skipped: int = 0  # files without a reference
    unmatched_refs: int = 0  # --refs ids with no row in files/

    def to_dict(self) -> dict[str, Any]:
        """``{"overall": {...}, "groups": {name: {...}}}``."""
        return {"overall": self.overall.to_dict(), "groups": {k: m.to_dict() for k, m in self.groups.items()}}


# ---------------------------------------------------------------- scoring

def _counts(output: Any) -> EditCounts:
    return EditCounts(output.hits, output.substitutions, output.deletions, output.insertions)


def score_normalized(ref: str, hyp: str) -> PairScore:
    """Align two already normalised texts; empty sides are handled here, not by jiwer."""
    ref_words, hyp_words = ref.split(), hyp.split()
    if not ref_words:
        return PairScore(EditCounts(insertions=len(hyp_words)), EditCounts(insertions=len(hyp)))
    if not hyp_words:
        return PairScore(EditCounts(deletions=len(ref_words)), EditCounts(deletions=len(ref)))
    return PairScore(_counts(jiwer.process_words(ref, hyp)), _counts(jiwer.process_characters(ref, hyp)))


def score_pair(reference: str | None, hypothesis: str | None) -> PairScore:
    """Normalise both texts and align them."""
    return score_normalized(normalize(reference), normalize(hypothesis))


def aggregate(scores: Iterable[PairScore], hallucination_like: int = 0) -> Metrics:
    """Corpus-level metrics: the counts of all pairs summed, then divided."""
    words, chars, n = EditCounts(), EditCounts(), 0
    for s in scores:
        words, chars, n = words + s.words, chars + s.chars, n + 1
    return Metrics(
        wer=words.error_rate, cer=chars.error_rate, mer=words.match_error_rate, wil=words.information_lost,
        substitutions=words.substitutions, deletions=words.deletions, insertions=words.insertions,
        hyp_ref_ratio=words.hyp_len / max(words.ref_len, 1), hallucination_like=hallucination_like, files=n,
    )


# ---------------------------------------------------------------- references

def _ref_line(path: str, lineno: int, line: str) -> tuple[str, str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RefsError(f"{path}, line {lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(obj, dict):
        raise RefsError(f"{path}, line {lineno}: expected a JSON object")
    file_id = obj.get("id", obj.get("path"))
    if isinstance(file_id, (int, float)) and not isinstance(file_id, bool):
        file_id = str(file_id)  # as the manifest reader does
    if not isinstance(file_id, str) or not file_id:
        raise RefsError(f"{path}, line {lineno}: needs a non-empty 'id' or 'path'")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise RefsError(f"{path}, line {lineno}: 'text' must be a string")
    return file_id, text


def load_refs(path: str) -> dict[str, str | None]:
    """id -> reference text from a JSON Lines manifest (``id`` defaults to ``path``; no ``text``: None)."""
    refs: dict[str, str | None] = {}
    lines = text_lines(path)
    try:
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            file_id, text = _ref_line(path, lineno, raw)
            if file_id in refs:
                raise RefsError(f"{path}, line {lineno}: duplicate id {file_id!r}")
            refs[file_id] = text
    except ManifestError as e:  # cannot open it, or a line that is not UTF-8
        raise RefsError(str(e)) from e
    finally:
        lines.close()
    return refs


# ---------------------------------------------------------------- a run

def _group_key(value: Any) -> str:
    if value is None:
        return MISSING_GROUP
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass(frozen=True)
class _Scored:
    file_id: str
    group: str | None
    score: PairScore


def _score_rows(rows: list[dict], by: str | None, refs: dict[str, str | None] | None) -> tuple[list[_Scored], int]:
    scored, skipped = [], 0
    for r in rows:
        ref = refs.get(r["file_id"]) if refs is not None else r.get("reference_text")
        if ref is None:
            skipped += 1
            continue
        hyp = (r.get("text") or "") if r.get("status") == "ok" else ""
        group = _group_key(r.get(by)) if by else None
        scored.append(_Scored(r["file_id"], group, score_pair(ref, hyp)))
    return scored, skipped


def evaluate(output: RunOutput, by: str | None = None, refs: dict[str, str | None] | None = None) -> EvalReport:
    """Score every file of a run that has a reference; ``by`` names a files/ column to group by.

    ``refs`` (id -> text, see :func:`load_refs`) replaces the files' ``reference_text`` when given.
    """
    if by is not None and by not in output.files_columns:
        raise KeyError(by)
    columns = ["file_id", "status", "text", "reference_text"] + ([by] if by else [])
    rows = output.files_table(columns).to_pylist()
    scored, skipped = _score_rows(rows, by, refs)
    unmatched = len(set(refs) - {r["file_id"] for r in rows}) if refs is not None else 0
    suspects = suspect_file_ids(output) if scored else set()
    overall = aggregate((s.score for s in scored), sum(1 for s in scored if s.file_id in suspects))
    groups: dict[str, list[_Scored]] = {}
    if by:
        for s in scored:
            groups.setdefault(s.group, []).append(s)
    by_group = {g: aggregate((s.score for s in ss), sum(1 for s in ss if s.file_id in suspects))
                for g, ss in sorted(groups.items())}
    log.info("scored %d files, skipped %d without a reference", len(scored), skipped)
    return EvalReport(overall, by_group, by, skipped, unmatched)


# ---------------------------------------------------------------- rendering

def format_json(report: EvalReport) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)


def format_csv(report: EvalReport) -> str:
    """One row for the whole run (scope ``overall``) and one per group (scope: the grouping column)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["scope", "group", *METRIC_KEYS])
    w.writerow(["overall", "", *(getattr(report.overall, k) for k in METRIC_KEYS)])
    for name, m in report.groups.items():
        w.writerow([report.by, name, *(getattr(m, k) for k in METRIC_KEYS)])
    return buf.getvalue()


_TABLE_HEAD = ("group", "files", "WER", "CER", "MER", "WIL", "sub", "del", "ins", "hyp/ref", "halluc.")


def _table_row(name: str, m: Metrics) -> tuple[str, ...]:
    return (name, str(m.files), f"{m.wer:.2%}", f"{m.cer:.2%}", f"{m.mer:.2%}", f"{m.wil:.2%}",
            str(m.substitutions), str(m.deletions), str(m.insertions), f"{m.hyp_ref_ratio:.3f}",
            str(m.hallucination_like))


def format_table(report: EvalReport) -> str:
    """An aligned text table: the groups (if any), then the overall row."""
    rows = [_table_row(name, m) for name, m in report.groups.items()]
    rows.append(_table_row("overall", report.overall))
    widths = [max(len(r[i]) for r in [_TABLE_HEAD, *rows]) for i in range(len(_TABLE_HEAD))]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
    lines = [f"by {report.by}" if report.by else "no grouping", fmt(_TABLE_HEAD)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)

