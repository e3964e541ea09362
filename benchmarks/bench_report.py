"""benchmarks.compare, reporting: the table's rows from the runs, the table, its metadata, and the
``<!-- bench:NAME -->`` block of BENCHMARKS.md that a rerun replaces."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.baselines import ct2_quantization
from benchmarks.bench_measure import GPU_POLL_S, STEADY_TRIM, device_description, model_description, score, versions
from benchmarks.bench_systems import ENV_SHOWN, KRASR_SYSTEMS, LABELS, SETTINGS, Context, RunResult, krasr_args


@dataclass
class Row:
    """One line of the table."""

    system: str
    files: int
    audio_s: float
    wall_s: float | None = None
    inner_s: float | None = None
    rtfx: float | None = None
    vs_krasr: float | None = None
    wer: float | None = None
    cer: float | None = None
    gpu_util: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def summarize(system: str, runs: list[RunResult], items: list[dict]) -> Row:
    """One table row from a system's runs: median wall of the good runs, accuracy of the first good run."""
    audio = sum(it["duration_s"] for it in items)
    row = Row(system, len(items), audio)
    good = [r for r in runs if r.error is None]
    errors = [r.error for r in runs if r.error is not None]
    if not good:
        row.note = f"failed: {errors[0]}" if errors else "not run"
        return row
    row.wall_s = statistics.median(r.wall_s for r in good)
    inner = [r.inner_s for r in good if r.inner_s is not None]
    row.inner_s = statistics.median(inner) if inner else None
    row.rtfx = audio / row.wall_s if row.wall_s > 0 else None
    row.wer, row.cer = score(items, good[0].texts)
    utils = [r.gpu_util for r in good if r.gpu_util is not None]
    row.gpu_util = statistics.median(utils) if utils else None
    notes = []
    if good[0].failed_files:
        notes.append(f"{good[0].failed_files} files failed")
    if errors:
        notes.append(f"{len(errors)} of {len(runs)} runs failed: {errors[0]}")
    row.note = "; ".join(notes)
    return row


def sample_items(items: list[dict], every: int) -> list[dict]:
    """Every ``every``-th item, from the first: a sample that keeps the set's mix of clips and long files."""
    return items[::every]


def build_rows(systems: list[str], results: dict[str, list[RunResult]], skipped: dict[str, str],
               items: list[dict], samples: dict[str, int] | None = None) -> list[Row]:
    """Rows in the order asked for, with each RTFx relative to krasr-batch's.

    ``samples``: systems run on every K-th file only (``--sample SYSTEM=K``); their row's files, audio, RTFx
    and error rates are the sample's, and its note gives krasr-batch's error rates on the same files.
    """
    samples = samples or {}
    rows = []
    for s in systems:
        mine = sample_items(items, samples[s]) if s in samples else items
        if s in skipped:
            rows.append(Row(s, len(mine), sum(it["duration_s"] for it in mine), note=f"skipped: {skipped[s]}"))
        else:
            rows.append(summarize(s, results[s], mine))
        if s in samples and "krasr" in results and not skipped.get(s):
            good = [r for r in results["krasr"] if r.error is None]
            if good:
                wer, cer = score(mine, good[0].texts)
                rows[-1].note = "; ".join(filter(None, [
                    f"every {samples[s]}-th file of the set ({len(mine)} files, {rows[-1].audio_s:.0f} s); "
                    f"krasr-batch on the same files: WER {_pct(wer)} %, CER {_pct(cer)} %", rows[-1].note]))
    ref = next((r.rtfx for r in rows if r.system == "krasr"), None)
    for r in rows:
        if ref and r.rtfx:
            r.vs_krasr = r.rtfx / ref
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def render_table(rows: list[Row], gpu_util: bool = False) -> str:
    """The Markdown table of the comparison."""
    head = ["system", "files", "audio s", "wall s", "in-process s", "RTFx", "vs krasr-batch", "WER %", "CER %"]
    if gpu_util:
        head.append("GPU util %")
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [LABELS.get(r.system, r.system), str(r.files), _fmt(r.audio_s, ".1f"), _fmt(r.wall_s, ".1f"),
                 _fmt(r.inner_s, ".1f"), _fmt(r.rtfx, ".2f"), _fmt(r.vs_krasr, ".2f", "×"),
                 _fmt(None if r.wer is None else 100 * r.wer, ".1f"),
                 _fmt(None if r.cer is None else 100 * r.cer, ".1f")]
        if gpu_util:
            cells.append(_fmt(r.gpu_util, ".0f"))
        cells.append(r.note.replace("|", "/").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(table: str, meta: dict[str, str]) -> str:
    """The table followed by its metadata as a Markdown list."""
    return table + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"


def metadata(a: argparse.Namespace, argv: list[str], items: list[dict], systems: list[str], ctx: Context) -> dict:
    """Date, device, model, corpus, settings and the exact command of a comparison."""
    langs = Counter(it.get("language", "?") for it in items)
    audio = sum(it["duration_s"] for it in items)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{ctx.device}: {device_description(ctx.device)}; load average before the runs "
                  f"{ctx.load_before:.2f}",
        "model": model_description(a.model),
        "corpus": f"{a.corpus} set `{a.set}`, {len(items)} files, {audio:.1f} s of audio "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(langs.items()))})",
        "timing": f"wall = whole command (interpreter start, imports, model load, transcription), median of "
                  f"{a.repeat} interleaved run(s); in-process = the system's own clock (model load + "
                  "transcription); RTFx = audio s / wall s",
        "accuracy": "corpus-level WER/CER (krasr_batch.evaluate, as krasr-batch eval) after krasr_batch.textnorm.normalize",
    }
    if a.gpu_util:
        meta["GPU util"] = (f"nvidia-smi utilization.gpu every {GPU_POLL_S} s, mean without the first and last "
                            f"{int(STEADY_TRIM * 100)} % of each run")
    for s in systems:
        text = SETTINGS[s].replace("{quantization}", ct2_quantization(ctx.device))
        args = krasr_args(s, ctx)
        if s in KRASR_SYSTEMS and args:
            text += f" (`{shlex.join(args)}`)"
        meta[f"settings {LABELS[s]}"] = text
    meta["versions"] = versions()
    env = {**{k: os.environ[k] for k in ENV_SHOWN if os.environ.get(k)}, **ctx.env}
    if env:
        meta["environment"] = " ".join(f"{k}={v}" for k, v in env.items())
    meta["command"] = f"`python -m benchmarks.compare {shlex.join(argv)}`"
    return meta


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block of ``path``, or append one."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- CLI
