"""Throughput and accuracy of krasr-batch against its peers, back to back on one corpus and one model.

    python -m benchmarks.compare --corpus DIR --model DIR [--set clips|long|all] [--device cpu|cuda]
        [--limit N] [--systems krasr,krasr-tf,card,chunked,faster-whisper] [--krasr-args "..."] [--repeat K]
        [--sample SYSTEM=K ...]
        [--env KEY=VALUE ...] [--gpu-util] [--write BENCHMARKS.md --section NAME] [--json OUT.json]
        [--work DIR]

Systems, each run as a whole command in its own process (wall time = the whole command: interpreter start,
imports, model load and transcription; for krasr-batch also the embedded Ray's start):

- ``krasr``: ``python -m krasr_batch run MANIFEST --out TMP --model M --no-progress [--device D] ...``;
  texts read from TMP/files.
- ``krasr-tf``: the same with ``--engine transformers`` last, to set krasr-batch's two engines side by side
  when --krasr-args picks ``--engine ctranslate2``.
- ``card``: the model card's usage, the transformers ASR pipeline one file at a time
  (benchmarks.baselines.card_usage).
- ``chunked``: the insanely-fast-whisper recipe: one pipeline call per language over the list of files,
  chunk_length_s=30, batch_size=16 (benchmarks.baselines.chunked_pipeline).
- ``faster-whisper``: faster-whisper's BatchedInferencePipeline on the weights converted to CTranslate2
  (float32 on the CPU, float16 on CUDA; the conversion is cached under --work and not timed). Where
  faster-whisper cannot run, its row says why.

For each system: audio seconds (file headers), wall seconds (median of --repeat runs, interleaved
A B C D A B C D ...), RTFx (audio s / wall s), its RTFx over krasr-batch's, and corpus-level WER/CER
against the corpus references after krasr_batch.textnorm.normalize. ``--write FILE --section NAME``
replaces the ``<!-- bench:NAME -->`` block of FILE (or appends one), so reruns refresh figures in place.

On a CPU shared with other work, OpenMP's spinning threads (torch, CTranslate2) can slow a system many
times over whenever another process holds a core; ``--env OMP_WAIT_POLICY=PASSIVE`` (set for every system,
and shown in the report) or a quiet machine keeps the comparison about the systems. krasr-batch sizes its
own model actor's torch threads (one core left to the segment tasks); the peers use every core.

This module is the command line; the systems are in ``bench_systems``, measuring (corpus, accuracy through
``krasr_batch.evaluate``, machine, GPU) in ``bench_measure``, the table and BENCHMARKS.md in ``bench_report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_measure import (  # noqa: F401 - the harness's names, as they were before the split
    GpuSampler,
    cpu_description,
    gpu_name,
    load_corpus,
    score,
    steady_mean,
    versions,
    write_manifest,
)
from benchmarks.bench_report import (  # noqa: F401
    Row,
    build_rows,
    metadata,
    render_report,
    render_table,
    sample_items,
    write_section,
)
from benchmarks.bench_systems import (  # noqa: F401
    KRASR_SYSTEMS,
    LABELS,
    SETTINGS,
    SYSTEMS,
    Context,
    RunResult,
    Skip,
    prepare,
    run_all,
)

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="corpus folder (clips.jsonl, long.jsonl)")
    ap.add_argument("--model", required=True, help="local model folder, transformers format")
    ap.add_argument("--set", choices=["clips", "long", "all"], default="clips")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees one, else cpu")
    ap.add_argument("--limit", type=int, default=0, help="only the first N files of the set")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ",".join(SYSTEMS))
    ap.add_argument("--krasr-args", default="", help="extra arguments for `krasr-batch run`, one string")
    ap.add_argument("--sample", action="append", default=[], metavar="SYSTEM=K",
                    help="run SYSTEM on every K-th file of the set only (e.g. card=4: the card's file-by-file usage "
                         "takes 20 minutes an hour of audio on 2 cores); its row says so and gives krasr-batch's "
                         "error rates on the same files; repeatable")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each system, interleaved; the median wall counts")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set for every system's command (e.g. OMP_WAIT_POLICY=PASSIVE on a shared CPU); repeatable")
    ap.add_argument("--gpu-util", action="store_true", help="sample GPU utilization during each run (CUDA)")
    ap.add_argument("--write", help="Markdown file whose bench block to replace or append (e.g. BENCHMARKS.md)")
    ap.add_argument("--section", help="name of the bench block (with --write)")
    ap.add_argument("--json", help="also write rows and metadata as JSON here")
    ap.add_argument("--texts", help="also write each system's transcript of each file (its last run) and the "
                                    "references as JSON here, to see where the error rates differ")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "krasr-batch-bench"),
                    help="cache for CTranslate2 conversions")
    a = ap.parse_args(argv)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        ap.error(f"unknown systems {unknown}; choose from {','.join(SYSTEMS)}")
    if bool(a.write) != bool(a.section):
        ap.error("--write and --section go together")
    if a.repeat < 1 or a.limit < 0:
        ap.error("--repeat must be at least 1 and --limit not negative")
    bad_env = [e for e in a.env if "=" not in e or not e.split("=", 1)[0]]
    if bad_env:
        ap.error(f"--env wants KEY=VALUE, got {bad_env}")
    a.systems = systems
    a.env = dict(e.split("=", 1) for e in a.env)
    try:
        a.sample = {k: int(v) for k, v in (x.split("=", 1) for x in a.sample)}
    except ValueError:
        ap.error(f"--sample wants SYSTEM=K, got {a.sample}")
    if any(k not in systems or v < 1 for k, v in a.sample.items()):
        ap.error(f"--sample: each SYSTEM must be among --systems and K at least 1, got {a.sample}")
    return a


def resolve_device(device: str | None) -> str:
    """The device asked for, else cuda when torch sees one, else cpu."""
    if device:
        return device
    from krasr_batch.engines import resolve_device as resolve

    return resolve("auto")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the report; 0 when every system that could run ran, 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    items = load_corpus(Path(a.corpus), a.set, a.limit)
    if not items:
        log.error("no files in set %s of %s", a.set, a.corpus)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="krasr-compare-"))
    try:
        ctx = Context(write_manifest(items, scratch / "manifest.jsonl"), str(Path(a.model).resolve()),
                      resolve_device(a.device), scratch, Path(a.work), shlex.split(a.krasr_args), a.gpu_util,
                      a.env)
        for system, every in a.sample.items():
            ctx.manifests[system] = write_manifest(sample_items(items, every), scratch / f"manifest-{system}.jsonl")
        results, skipped = run_all(a.systems, ctx, a.repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = build_rows(a.systems, results, skipped, items, a.sample)
    meta = metadata(a, argv, items, a.systems, ctx)
    report = render_report(render_table(rows, a.gpu_util and ctx.device == "cuda"), meta)
    print(report)
    if a.write:
        write_section(Path(a.write), a.section, f"### {a.section}\n\n{report}")
        log.info("wrote block %r of %s", a.section, a.write)
    if a.texts:
        refs = {it["id"]: it.get("text") or it.get("reference_text") or "" for it in items}
        Path(a.texts).write_text(json.dumps({"references": refs, **{s: r[-1].texts for s, r in results.items() if r}},
                                            ensure_ascii=False, indent=1), encoding="utf-8")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "metadata": meta},
                                           ensure_ascii=False, indent=1), encoding="utf-8")
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
