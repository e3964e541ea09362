"""Peak memory of the decode-and-segment stage against recording length.

    python -m benchmarks.memory --corpus DIR [--minutes 10 60 180] [--work DIR]

Builds recordings of the given lengths by repeating the corpus's long recordings (FLAC, 22.05 kHz
mono, so decoding, resampling and VAD all run), then runs the stage (krasr_batch.segment.analyse plus
segment_audio, exactly what each Ray task runs per file) in a fresh process per recording and reports
its peak RSS (ru_maxrss) and wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf


def build(corpus: Path, minutes: float, dest: Path) -> Path:
    if dest.exists():
        return dest
    from krasr_batch.audio import load_audio

    longs = [json.loads(x) for x in (corpus / "long.jsonl").read_text().splitlines() if x.strip()]
    pieces = [load_audio(str(corpus / r["path"])) for r in longs]
    rate = 22050
    import soxr

    pieces = [soxr.resample(p, 16000, rate) for p in pieces]
    need = int(minutes * 60 * rate)
    tmp = dest.with_suffix(".partial.flac")
    with sf.SoundFile(tmp, "w", samplerate=rate, channels=1, format="FLAC") as f:
        done, k = 0, 0
        while done < need:
            p = pieces[k % len(pieces)][: need - done]
            f.write(p)
            done += len(p)
            k += 1
    tmp.rename(dest)
    return dest


def stage(path: str) -> None:
    """Child process: run the stage on one file and print its figures as JSON."""
    from krasr_batch.segment import analyse, segment_audio
    from krasr_batch.settings import SegmentOptions

    t0 = time.perf_counter()
    plan = analyse(path, SegmentOptions())
    n, samples = 0, 0
    for audio in segment_audio(plan):
        n += 1
        samples += len(audio)
    print(json.dumps({"duration_s": plan.duration_s, "segments": n, "speech_s": plan.speech_s,
                      "wall_s": time.perf_counter() - t0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--minutes", type=float, nargs="+", default=[10, 60, 180])
    ap.add_argument("--work", default="/tmp/krasr-memory")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage:
        stage(a.stage)
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in a.minutes:
        path = build(Path(a.corpus), m, work / f"rec_{int(m)}min.flac")
        r = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--corpus", a.corpus, "--stage", str(path)],
                           capture_output=True, text=True, check=True)
        fig = json.loads(r.stdout.strip().splitlines()[-1])
        fig["minutes"] = m
        rows.append(fig)
        print(json.dumps(fig), flush=True)
    print("\n| recording | segments | peak RSS (MB) | wall (s) | x real time |")
    print("|---|---|---|---|---|")
    for f in rows:
        print(f"| {f['minutes']:g} min | {f['segments']} | {f['peak_rss_mb']:.0f} | {f['wall_s']:.1f} | "
              f"{f['duration_s'] / f['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
