"""Words and languages (issue 14): word-boundary error, what word timing costs, and language-ID accuracy.

    python -m benchmarks.words --corpus DIR --model DIR [--engines transformers,ctranslate2] [--repeat 1]
        [--write BENCHMARKS.md] [--json out.json] [--work DIR]
    python -m benchmarks.words --from-json out.json [more.json ...] --write BENCHMARKS.md
        # report saved runs again (several: one report, e.g. engines measured apart)

Everything runs through the real pipeline (``krasr_batch.pipeline.run``, one local Ray for the whole script,
each run a fresh ``--out``), so a run's wall time includes the model replicas' start and load.

- **boundaries** (block ``words-boundaries``): the corpus long recordings (``long.jsonl``) with
  ``--word-timestamps``, scored against ``spans.jsonl`` (each sentence's start and end as synthesised). The
  synthetic speech is hard for a small model (word error rate near 95 % for whisper-base), so hypothesis
  words are matched to sentences by time, not by text: each word goes to the sentence whose span holds its
  midpoint (else the nearest span); a sentence's error is |first word's start - span start| and |last
  word's end - span end|. Median and 90th percentile per engine; the engines' agreement is the median
  |difference| of their boundaries, sentence by sentence. A span of ``spans.jsonl`` is where the
  synthesizer's output for the sentence lies, and espeak-ng ends each with about 0.4 s of silence; so the
  errors are also given against each span's sound (the span trimmed to its 10 ms frames above three times
  the recording's noise floor), and signed (word time - reference: negative is early).
- **cost** (block ``words-cost``): the same recordings without and with ``--word-timestamps``, ``--repeat``
  times, alternating; the median wall seconds of each, and of the model's own seconds (the segments'
  ``decode_s``, once per batch), and the texts compared (they must be equal).
- **language ID** (block ``words-language-id``): the ``ru`` and ``kk`` clips with ``--language auto``, unrestricted
  and with ``--languages kk,ru``; a clip's language is that of its longest speech (``files/`` ``language_s``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_measure import cpu_description, versions
from benchmarks.bench_report import write_section

CODES = {"russian": "ru", "kazakh": "kk"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _manifest(rows: list[dict], corpus: Path, path: Path, keep_language: bool) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            row = {"id": r["id"], "path": str(corpus / r["path"])}
            if keep_language:
                row["language"] = r["language"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _table(out: Path, name: str) -> list[dict]:
    import pyarrow.dataset as pads

    if not (out / name).exists():
        return []
    return pads.dataset(out / name, format="parquet").to_table().to_pylist()


def _run(manifest: Path, out: Path, options: dict) -> float:
    from krasr_batch.pipeline import run
    from krasr_batch.settings import build_settings

    t0 = time.perf_counter()
    stats = run(str(manifest), str(out), build_settings(options), overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    if stats.output_failed:
        raise SystemExit(f"{stats.output_failed} files failed in {out}")
    return wall


def _decode_s(out: Path) -> float:
    """The model's seconds: each batch's decode_s once (every segment of a batch carries the batch's)."""
    seen = {(r["worker"], r["decode_s"], r["batch_size"]) for r in _table(out, "segments")}
    return sum(d for _, d, _ in seen)


# ---------------------------------------------------------------- boundaries

def sentence_boundaries(words: list[dict], spans: list[dict]) -> list[tuple[float | None, float | None]]:
    """For each span (one file's, in order), (first word's start, last word's end) of the words matched to it
    by time (a word goes to the span holding its midpoint, else the nearest); None where no word matched."""
    starts = np.array([s["start_s"] for s in spans])
    ends = np.array([s["end_s"] for s in spans])
    got: list[list[dict]] = [[] for _ in spans]
    for w in words:
        mid = (w["start_s"] + w["end_s"]) / 2
        dist = np.maximum(starts - mid, 0) + np.maximum(mid - ends, 0)
        got[int(np.argmin(dist))].append(w)
    return [(min(w["start_s"] for w in g), max(w["end_s"] for w in g)) if g else (None, None) for g in got]


FRAME_S = 0.01


def sound_bounds(audio: np.ndarray, spans: list[dict], sr: int = 16000) -> list[tuple[float, float]]:
    """Each span trimmed to its sound: its first and last 10 ms frame whose RMS is above three times the
    recording's noise floor (the 10th percentile of its frames' RMS; the corpus adds noise to its pauses)
    and above 1 % of the span's loudest frame."""
    n = int(sr * FRAME_S)
    rms = np.sqrt(np.mean(np.square(audio[:len(audio) // n * n].reshape(-1, n), dtype=np.float64), axis=1))
    floor = 3 * float(np.percentile(rms, 10))
    out = []
    for sp in spans:
        a, b = int(round(sp["start_s"] / FRAME_S)), int(round(sp["end_s"] / FRAME_S))
        seg = rms[a:b]
        loud = np.flatnonzero(seg > max(floor, 0.01 * float(seg.max()))) if len(seg) else []
        out.append((a * FRAME_S + loud[0] * FRAME_S, a * FRAME_S + (loud[-1] + 1) * FRAME_S) if len(loud)
                   else (sp["start_s"], sp["end_s"]))
    return out


def boundary_errors(out: Path, spans_by_file: dict[str, list[dict]],
                    sound: dict[str, list[tuple[float, float]]] | None = None) -> dict[str, list]:
    """Signed errors (word time - reference) of each sentence's first start and last end, against the spans
    and, with ``sound``, against each span's sound."""
    words_by_file: dict[str, list[dict]] = {}
    for w in _table(out, "words"):
        if w["word"].strip():
            words_by_file.setdefault(w["file_id"], []).append(w)
    found, missing = {}, 0
    err: dict[str, list[float]] = {"start": [], "end": [], "sound_start": [], "sound_end": []}
    for fid, spans in spans_by_file.items():
        b = sentence_boundaries(words_by_file.get(fid, []), spans)
        found[fid] = b
        heard = (sound or {}).get(fid) or [None] * len(spans)
        for (s, e), span, h in zip(b, spans, heard):
            if s is None:
                missing += 1
                continue
            err["start"].append(s - span["start_s"])
            err["end"].append(e - span["end_s"])
            if h is not None:
                err["sound_start"].append(s - h[0])
                err["sound_end"].append(e - h[1])
    return {"found": found, "missing": missing, **err}


def _stats(xs: list[float]) -> dict[str, float | None]:
    """Median and 90th percentile of |x|, and the median of x itself (signed)."""
    if not xs:
        return {"median": None, "p90": None, "signed": None, "n": 0}
    a = np.abs(xs)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "signed": float(np.median(xs)),
            "n": len(xs)}


def agreement(found: dict[str, dict]) -> dict | None:
    """Median |difference| of two engines' sentence boundaries (``found``: engine -> file -> boundaries)."""
    if len(found) != 2:
        return None
    a, b = found.values()
    return _stats([x - y for fid in a if fid in b for pa_, pb in zip(a[fid], b[fid]) for x, y in zip(pa_, pb)
                   if x is not None and y is not None])


# which block each part of a saved run goes to, and the engines it holds rows for
_BLOCKS = {"boundaries": "words-boundaries", "cost": "words-cost", "language_id": "words-language-id"}


def _engines_in(key: str, value: dict) -> list[str]:
    if key == "language_id":
        return list(dict.fromkeys(k.split("|")[0] for k in value if "|" in k))
    return list(value)


def merge(runs: list[dict]) -> dict:
    """Several saved runs (--json) as one: engines and parts measured apart reported together. A later run's
    figures replace an earlier one's for the same engine and part, and each block's metadata names, for each
    engine, the run its rows come from (``block_meta``), so that a replaced run's date never stays behind."""
    out: dict = {"engines": [], "meta": "", "block_meta": {}}
    for r in runs:
        out["engines"] += [e for e in r["engines"] if e not in out["engines"]]
        for key, value in r.items():
            if key in ("engines", "meta", "agreement"):
                continue
            if isinstance(value, dict) and isinstance(out.get(key), dict):  # by engine: boundaries, cost, found, ...
                out[key] = {**out[key], **value}
            else:
                out[key] = value
            if key in _BLOCKS and isinstance(value, dict):
                for e in _engines_in(key, value):
                    out["block_meta"].setdefault(_BLOCKS[key], {})[e] = r["meta"]
    if "found" in out:
        out["agreement"] = agreement(out["found"])
    out["block_meta"] = {block: _meta_by_engine(by_engine) for block, by_engine in out["block_meta"].items()}
    metas = set(out["block_meta"].values())
    out["meta"] = metas.pop() if len(metas) == 1 else ""
    return out


def _meta_by_engine(by_engine: dict[str, str]) -> str:
    """One run's metadata as it is; several runs' each under the engines whose rows come from it."""
    groups: dict[str, list[str]] = {}
    for e, m in by_engine.items():
        groups.setdefault(m, []).append(e)
    if len(groups) == 1:
        return next(iter(groups))
    return "".join(f"- {', '.join(es)} rows:\n" + "".join(f"  {line}\n" for line in m.splitlines() if line.strip())
                   for m, es in groups.items())


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", help="the test corpus (required unless --from-json)")
    ap.add_argument("--model", help="the model folder (required unless --from-json)")
    ap.add_argument("--engines", default="transformers,ctranslate2")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each setting for the cost (median)")
    ap.add_argument("--parts", default="boundaries,language",
                    help="boundaries (with the cost), cost (the same runs, only the cost kept), language")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--work", help="folder for the runs' output (default: a temporary folder)")
    ap.add_argument("--write", help="BENCHMARKS.md to update")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--from-json", nargs="+", help="no runs: report (and --write) what earlier --json files hold")
    a = ap.parse_args(argv)
    if a.from_json:
        results = merge([json.loads(Path(f).read_text()) for f in a.from_json])
        _report(results, results["meta"], a.write)
        return
    if not (a.corpus and a.model):
        ap.error("--corpus and --model are required (unless --from-json)")
    import ray

    corpus, engines, parts = Path(a.corpus), a.engines.split(","), a.parts.split(",")
    work = Path(a.work or tempfile.mkdtemp(prefix="krasr-words-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.words " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
    meta = (f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
            f"- device: cpu: {cpu_description()}; load average before the runs {load}; local Ray with "
            f"{a.num_cpus} CPUs, the default replicas (one single-threaded replica per core)\n"
            f"- model: {a.model}\n- versions: {versions()}\n- command: `{command}`\n")
    results: dict = {"engines": engines, "meta": meta}
    ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        if "boundaries" in parts or "cost" in parts:
            measured = _boundaries_and_cost(corpus, a.model, engines, a.repeat, work)
            if "boundaries" not in parts:  # the cost alone: its boundaries stay out of what --from-json merges
                for key in ("boundaries", "found", "agreement"):
                    measured.pop(key)
            results.update(measured)
        if "language" in parts:
            results["language_id"] = _language_id(corpus, a.model, engines, work)
    finally:
        ray.shutdown()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    _report(results, meta, a.write)


def _report(results: dict, meta: str, write: str | None) -> None:
    print(render(results, meta))
    if write:
        for name, body in report_blocks(results, meta).items():
            write_section(Path(write), name, body)


def _boundaries_and_cost(corpus: Path, model: str, engines: list[str], repeat: int, work: Path) -> dict:
    longs = _read_jsonl(corpus / "long.jsonl")
    spans: dict[str, list[dict]] = {}
    for s in _read_jsonl(corpus / "spans.jsonl"):
        spans.setdefault(s["id"], []).append(s)
    manifest = _manifest(longs, corpus, work / "long.jsonl", keep_language=True)
    audio_s = sum(r["duration_s"] for r in longs)
    out: dict = {"audio_s": audio_s, "files": len(longs), "sentences": sum(len(v) for v in spans.values()),
                 "boundaries": {}, "cost": {}}
    from krasr_batch.audio import load_audio

    sound = {r["id"]: sound_bounds(load_audio(str(corpus / r["path"])), spans[r["id"]]) for r in longs}
    found = out["found"] = {}
    for engine in engines:
        walls: dict[bool, list[float]] = {False: [], True: []}
        model_s: dict[bool, list[float]] = {False: [], True: []}
        texts = {}
        for k in range(repeat):
            for words in ((False, True) if k % 2 == 0 else (True, False)):
                dest = work / f"long-{engine}-{words}"
                walls[words].append(_run(manifest, dest, {"model": model, "engine": engine, "word_timestamps": words}))
                model_s[words].append(_decode_s(dest))
                texts[words] = sorted((r["file_id"], r["segment_index"], r["text"]) for r in _table(dest, "segments"))
        w0, w1 = statistics.median(walls[False]), statistics.median(walls[True])
        m0, m1 = statistics.median(model_s[False]), statistics.median(model_s[True])
        out["cost"][engine] = {"wall_plain_s": w0, "wall_words_s": w1, "wall_pct": 100 * (w1 - w0) / w0,
                               "model_plain_s": m0, "model_words_s": m1, "model_pct": 100 * (m1 - m0) / m0,
                               "runs": repeat, "same_text": texts[False] == texts[True],
                               "walls": walls, "model_s": model_s}
        err = boundary_errors(work / f"long-{engine}-True", spans, sound)
        found[engine] = err.pop("found")
        out["boundaries"][engine] = {"start": _stats(err["start"]), "end": _stats(err["end"]),
                                     "both": _stats(err["start"] + err["end"]),
                                     "sound_start": _stats(err["sound_start"]), "sound_end": _stats(err["sound_end"]),
                                     "sound_both": _stats(err["sound_start"] + err["sound_end"]),
                                     "missing": err["missing"]}
    out["agreement"] = agreement(found)
    return out


def _language_id(corpus: Path, model: str, engines: list[str], work: Path) -> dict:
    clips = [r for r in _read_jsonl(corpus / "clips.jsonl") if r["category"] in ("ru", "kk")]
    manifest = _manifest(clips, corpus, work / "clips.jsonl", keep_language=False)
    expected = {r["id"]: CODES[r["language"]] for r in clips}
    out: dict = {"clips": len(clips), "by_category": {c: sum(1 for r in clips if r["category"] == c) for c in ("ru", "kk")}}
    for engine in engines:
        for name, langs in (("auto", None), ("auto --languages kk,ru", "kk,ru")):
            dest = work / f"lid-{engine}-{'kkru' if langs else 'all'}"
            wall = _run(manifest, dest, {"model": model, "engine": engine, "language": "auto", "languages": langs})
            got = {}
            for f in _table(dest, "files"):
                by_lang = dict(f["language_s"] or {})
                got[f["file_id"]] = max(by_lang, key=by_lang.get) if by_lang else None
            correct = {c: sum(1 for fid, code in expected.items() if code == c and got.get(fid) == c) for c in ("ru", "kk")}
            chosen: dict[str, int] = {}
            for code in got.values():
                chosen[str(code)] = chosen.get(str(code), 0) + 1
            out[f"{engine}|{name}"] = {"accuracy": sum(correct.values()) / len(clips), "correct": correct,
                                       "chosen": dict(sorted(chosen.items(), key=lambda kv: -kv[1])), "wall_s": wall}
    return out


def _f(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def report_blocks(r: dict, meta: str) -> dict[str, str]:
    blocks = {}
    block_meta = r.get("block_meta", {})
    if "boundaries" in r:
        rows = ["| engine | reference | sentences timed | start error median / p90 s | end error median / p90 s | "
                "both ends median / p90 s | signed median start / end s |", "|---|---|---|---|---|---|---|"]
        for e, b in r["boundaries"].items():
            for ref, key in (("spans.jsonl", ""), ("the span's sound", "sound_")):
                if key + "both" not in b:
                    continue
                st, en, both = b[key + "start"], b[key + "end"], b[key + "both"]
                rows.append(f"| {e} | {ref} | {both['n'] // 2 if both['n'] else 0} of {r['sentences']} | "
                            f"{_f(st['median'])} / {_f(st['p90'])} | {_f(en['median'])} / {_f(en['p90'])} | "
                            f"**{_f(both['median'])}** / {_f(both['p90'])} | "
                            f"{_f(st.get('signed'), '+.2f')} / {_f(en.get('signed'), '+.2f')} |")
        agree = r.get("agreement")
        blocks["words-boundaries"] = (
            "### words-boundaries\n\n" + "\n".join(rows) + "\n\n"
            + (f"Engines agree: median |difference| of their sentence boundaries {_f(agree['median'])} s "
               f"(p90 {_f(agree['p90'])} s, {agree['n']} boundaries).\n\n" if agree else "")
            + f"- corpus: {r['files']} long recordings ({r['audio_s']:.1f} s), {r['sentences']} sentences with their "
              "spans (spans.jsonl); manifest language (kazakh), `--word-timestamps`, other settings the defaults\n"
            + "- method: words matched to sentences by time (a word goes to the span holding its midpoint, else the "
              "nearest); error = |first word's start - span start| and |last word's end - span end|; signed = "
              "word time - reference (negative: early). The span's sound: the span trimmed to its 10 ms frames "
              "above 3x the recording's noise floor (espeak-ng ends each sentence with about 0.4 s of silence, "
              "which spans.jsonl counts in)\n" + block_meta.get("words-boundaries", meta))
    if "cost" in r:
        rows = ["| engine | runs each | wall without / with s | wall cost | model s without / with | model cost | "
                "text equal |", "|---|---|---|---|---|---|---|"]
        for e, c in r["cost"].items():
            rows.append(f"| {e} | {c['runs']} | {c['wall_plain_s']:.1f} / {c['wall_words_s']:.1f} | "
                        f"{c['wall_pct']:+.1f} % | {c['model_plain_s']:.1f} / {c['model_words_s']:.1f} | "
                        f"{c['model_pct']:+.1f} % | {'yes' if c['same_text'] else 'NO'} |")
        blocks["words-cost"] = (
            "### words-cost\n\n" + "\n".join(rows) + "\n\n"
            + f"- the long recordings ({r['audio_s']:.1f} s) without and with `--word-timestamps`, the median of the "
              "runs each, alternating; wall = `krasr_batch.pipeline.run` (replica start, model load, "
              "transcription, commit; one Ray for the script); model s = the batches' decode_s summed (the "
              "model calls, alignment included)\n" + block_meta.get("words-cost", meta))
    if "language_id" in r:
        li = r["language_id"]
        rows = ["| engine | detection | accuracy | ru correct | kk correct | languages chosen |", "|---|---|---|---|---|---|"]
        for key, v in li.items():
            if "|" not in key:
                continue
            e, name = key.split("|")
            chosen = ", ".join(f"{k} {n}" for k, n in v["chosen"].items())
            rows.append(f"| {e} | `{name}` | {100 * v['accuracy']:.0f} % | {v['correct']['ru']} of "
                        f"{li['by_category']['ru']} | {v['correct']['kk']} of {li['by_category']['kk']} | {chosen} |")
        blocks["words-language-id"] = (
            "### words-language-id\n\n" + "\n".join(rows) + "\n\n"
            + f"- corpus: the {li['clips']} `ru` and `kk` clips of clips.jsonl, manifest without languages; a clip's "
              "language = the language of most of its speech (files/ language_s)\n"
            + block_meta.get("words-language-id", meta))
    return blocks


def render(r: dict, meta: str) -> str:
    return "\n\n".join(report_blocks(r, meta).values())


if __name__ == "__main__":
    main()
