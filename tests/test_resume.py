"""Nothing lost, nothing doubled: SIGKILLed runs resume to exactly an uninterrupted run's output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from .conftest import REPO, read_jsonl, write_manifest

pytestmark = pytest.mark.e2e  # Ray runs in subprocesses

TIMING = {"decode_s", "batch_size", "worker", "segment_wall_s"}  # how long, not what


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "krasr_batch", *args], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split()
    return [int(p) for p, s in zip(out[::2], out[1::2]) if int(s) == sid]


def cmdline(pid: int) -> str:
    """A process's command line, or "" for one that ended since it was listed (Ray's short-lived helpers)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def kill_run(p: subprocess.Popen) -> None:
    """SIGKILL the whole process group, then anything else of its session (Ray workers), as a preemption would."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has ended already
        pass
    p.wait()
    deadline = time.time() + 30
    while (left := session_pids(p.pid)) and time.time() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not session_pids(p.pid)


def committed(out: Path) -> int:
    d = out / "files"
    if not d.exists():
        return 0
    return sum(pq.ParquetFile(f).metadata.num_rows for f in d.glob("*.parquet"))


def wait_until(cond, p: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert p.poll() is None, f"the run ended before the kill point:\n{p.stdout.read()[-3000:]}"
        assert time.time() < deadline, "kill point not reached"
        time.sleep(0.1)


def table(out: Path, name: str, keys: list[str]) -> list[dict]:
    rows = pads.dataset(out / name, format="parquet").to_table().to_pylist()
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    return sorted(rows, key=lambda r: tuple(r[k] for k in keys))


@pytest.fixture(scope="module")
def job(tmp_path_factory, corpus, tiny_model):
    """61 files (the corpus clips, bad inputs, a long recording) and an uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("resume")
    rows = [{"id": c["id"], "path": str(corpus / c["path"]), "language": c["language"]}
            for c in read_jsonl(corpus / "clips.jsonl")]
    for b in read_jsonl(corpus / "bad.jsonl")[:10]:
        rows.append({"id": b["id"], "path": str(corpus / b["path"]), "expect": b["expect"]})
    rows.append({"id": "long", "path": str(corpus / read_jsonl(corpus / "long.jsonl")[0]["path"])})
    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    args = ["--model", str(tiny_model), "--batch-size", "1", "--flush-s", "0.3", "--no-progress",
            "--max-failed-fraction", "0.5", "--word-timestamps"]  # words/ follows the commit protocol too
    ref = tmp / "reference"
    p = start(["run", str(manifest), "--out", str(ref), *args])
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 3, out[-3000:]
    return manifest, args, ref, len(rows)


def test_sigkill_at_three_points_then_rerun_equals_uninterrupted(job, tmp_path):
    manifest, args, ref, n = job
    out = tmp_path / "out"
    cmd = ["run", str(manifest), "--out", str(out), *args]
    points = [
        lambda: (out / "_work" / "manifest.parquet").exists(),  # started, nothing committed yet
        lambda: committed(out) >= 20,  # a few parts in
        lambda: committed(out) >= int(0.75 * n),  # most of the way
    ]
    seen = []
    for point in points:
        p = start(cmd)
        wait_until(point, p)
        kill_run(p)
        seen.append(committed(out))
        # what a reader sees after the kill is whole: every visible part reads, no file is doubled
        ids = duckdb.connect().execute(f"select count(*), count(distinct file_id) from '{out}/files/*.parquet'").fetchone() \
            if seen[-1] else (0, 0)
        assert ids[0] == ids[1] == seen[-1]
    assert seen[0] < seen[1] < seen[2] < n, seen
    p = start(cmd)
    log, _ = p.communicate(timeout=900)
    assert p.returncode == 3, log[-3000:]
    assert f"{seen[2]} already done by an earlier run" in log
    assert table(out, "files", ["file_id"]) == table(ref, "files", ["file_id"])
    assert table(out, "segments", ["file_id", "segment_index"]) == table(ref, "segments", ["file_id", "segment_index"])
    words = ["file_id", "segment_index", "word_index"]
    assert table(out, "words", words) == table(ref, "words", words) and table(ref, "words", words)
    for d in ("files", "segments", "words"):
        assert not list((out / d).glob(".tmp-*"))
    assert (out / "_SUCCESS").exists()


def test_killed_model_actor_is_replaced_and_readers_never_see_partial_files(job, tmp_path):
    manifest, args, ref, n = job
    out = tmp_path / "out"
    errors: list[str] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:  # polls the output as an analyst would, reading every visible file
        while not stop.is_set():
            for sub in ("segments", "files"):
                d = out / sub
                for f in sorted(d.glob("*.parquet")) if d.exists() else []:
                    try:
                        pq.read_table(f)
                        reads[0] += 1
                    except FileNotFoundError:
                        pass
                    except Exception as e:  # noqa: BLE001
                        errors.append(f"{f.name}: {e}")
            time.sleep(0.02)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    p = start(["run", str(manifest), "--out", str(out), *args])
    try:
        wait_until(lambda: committed(out) >= 20, p)
        actors = [pid for pid in session_pids(p.pid) if "ModelStage" in cmdline(pid)]
        assert actors, "no model actor found"
        for pid in actors:
            os.kill(pid, signal.SIGKILL)
        log, _ = p.communicate(timeout=900)
    finally:
        stop.set()
        t.join()
        if p.poll() is None:
            kill_run(p)
    assert p.returncode == 3, log[-3000:]
    assert errors == []
    assert reads[0] > 0
    assert table(out, "files", ["file_id"]) == table(ref, "files", ["file_id"])
    assert table(out, "segments", ["file_id", "segment_index"]) == table(ref, "segments", ["file_id", "segment_index"])


def test_sigterm_and_sighup_commit_what_is_finished_and_exit_143_and_129(job, tmp_path):
    """A scheduler's stop (Slurm's time limit, a Kubernetes eviction) is a SIGTERM to the driver; a closed
    terminal or ssh session is a SIGHUP to the run's whole process group, Ray's processes included. Either
    way the files it has finished are committed (never, here, by the periodic commit), it says so, exits
    128 + the signal, leaves no process behind and resumes. Before, a SIGHUP killed the driver (no commit),
    and once it was handled, Ray's processes died of it first and Ray ended the driver with exit 1 and
    nothing committed (one time in two)."""
    manifest, args, ref, n = job
    out = tmp_path / "out"
    cmd = ["run", str(manifest), "--out", str(out), *[a for a in args if a != "--no-progress"],
           "--progress-every", "0.5", "--flush-s", "100000", "--flush-files", "100000"]

    def stop(at: int, send) -> tuple[int, str]:
        p = start(cmd)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
        reader.start()

        def finished() -> int:  # the progress line (a new line every 0.5 s here, off a terminal): "files N/M (..."
            counts = [int(x.split()[1].split("/")[0]) for x in list(lines) if x.startswith("files ")]
            return counts[-1] if counts else 0

        before = committed(out)
        deadline = time.time() + 300
        while finished() < at:
            assert p.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        assert committed(out) == before  # nothing committed yet: all of it waits for the end of the run
        send(p)
        p.wait(timeout=120)
        reader.join(timeout=10)
        log = "".join(lines)
        try:
            deadline = time.time() + 10
            while session_pids(p.pid) and time.time() < deadline:
                time.sleep(0.2)
            assert not session_pids(p.pid), [cmdline(pid)[:100] for pid in session_pids(p.pid)]
        finally:
            kill_run(p)
        return p.returncode, log

    status, log = stop(20, lambda p: p.send_signal(signal.SIGTERM))  # the driver alone: `kill PID`, a container stop
    assert status == 143, log[-3000:]
    assert "stopped by SIGTERM; finished files are kept" in log and "Traceback" not in log
    kept = committed(out)
    assert kept >= 20, (kept, log[-2000:])

    status, log = stop(kept + 10, lambda p: os.killpg(p.pid, signal.SIGHUP))  # the terminal's process group
    assert status == 129, log[-3000:]
    assert "stopped by SIGHUP (its terminal closed" in log and "Traceback" not in log
    kept, before = committed(out), kept
    assert kept >= before + 10, (before, kept, log[-2000:])

    # the rest in passes of 15 files (two Ray Data executions, the replicas started anew for each, as a large
    # manifest goes through): the same output as the uninterrupted run in one
    r = start(["run", str(manifest), "--out", str(out), *args, "--pass-files", "15"])
    log, _ = r.communicate(timeout=900)
    assert r.returncode == 3, log[-3000:]
    assert f"{kept} already done by an earlier run" in log
    assert json.loads((out / "run.json").read_text())["passes"] == -(-(n - kept) // 15) >= 2
    assert table(out, "files", ["file_id"]) == table(ref, "files", ["file_id"])
    assert table(out, "segments", ["file_id", "segment_index"]) == table(ref, "segments", ["file_id", "segment_index"])


def test_a_manifest_of_several_row_groups_is_decoded_from_the_start(tmp_path, tiny_model, corpus):
    """150,000 lines (three of the normalized manifest's 50,000-file row groups): Ray Data re-sliced each row
    group in a long-lived task, three at once took the CPU room kept for a decode-and-segment task on a
    2-CPU node, and no file was ever decoded (a million-file manifest stalled the same way). One re-slicing
    task at a time leaves that room: files are committed within a minute or two, and a SIGTERM stops it."""
    clips = [c for c in read_jsonl(corpus / "clips.jsonl") if c["path"].endswith(".wav")][:10]
    manifest = tmp_path / "m.jsonl"
    with open(manifest, "w") as f:
        for i in range(150_000):
            f.write(json.dumps({"id": f"f{i:06d}", "path": str(corpus / clips[i % len(clips)]["path"])}) + "\n")
    out = tmp_path / "out"
    p = start(["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--no-progress",
               "--num-cpus", "2", "--flush-s", "0.3", "--stall-timeout", "150"])
    try:
        deadline = time.time() + 300
        while committed(out) < 20 and p.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert committed(out) >= 20, p.stdout.read()[-3000:] if p.poll() is not None else "nothing committed"
        p.send_signal(signal.SIGTERM)
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 143, log[-3000:]
    finally:
        kill_run(p)


def test_a_rerun_with_another_manifest_does_its_new_files_and_keeps_the_old(tmp_path, tiny_model, corpus):
    """The same --out with a shifted manifest, then a smaller one. Before: the second run counted the 6 files
    done by the first as its own skipped lines, processed none of its 4 new files and exited 0; the third
    exited 1 with 'the run ended with 10 of 4 files committed'."""
    clips = read_jsonl(corpus / "clips.jsonl")[:10]
    out = tmp_path / "out"

    def run_lines(lo: int, hi: int) -> tuple[str, dict]:
        # 'speaker' as text in the first manifest, as numbers in the next: written as text, one table
        rows = [{**c, "speaker": f"s{i}" if lo == 0 else i} for i, c in enumerate(clips[lo:hi], lo)]
        manifest = write_manifest(tmp_path / f"m{lo}_{hi}.jsonl", rows, base=corpus)
        p = start(["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--no-progress"])
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]
        return log, json.loads((out / "run.json").read_text())

    run_lines(0, 6)
    log, info = run_lines(4, 10)
    assert "4 processed in this run, 2 already done by an earlier run" in log
    assert (info["counts"]["files_this_run"], info["output"]["not_in_manifest"]) == (4, 4)
    ids = pads.dataset(out / "files", format="parquet").to_table(columns=["file_id"]).column(0).to_pylist()
    assert sorted(ids) == sorted(c["id"] for c in clips)
    log, info = run_lines(0, 4)
    assert "0 processed in this run, 4 already done" in log and "6 of them committed by earlier runs" in log
    assert info["output"] == {**info["output"], "ok": 10, "not_in_manifest": 6}
    import pandas as pd

    speakers = pd.read_parquet(out / "files").set_index("file_id")["speaker"].to_dict()
    assert speakers == {c["id"]: f"s{i}" if i < 6 else str(i) for i, c in enumerate(clips)}


def test_mostly_broken_inputs_stop_the_run(tmp_path, tiny_model, corpus):
    clip = corpus / read_jsonl(corpus / "clips.jsonl")[0]["path"]
    rows = [{"id": f"ok{i}", "path": str(clip)} for i in range(10)]
    rows += [{"id": f"gone{i}", "path": f"/mnt/unmounted/{i}.wav"} for i in range(150)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = start(["run", str(manifest), "--out", str(tmp_path / "out"), "--model", str(tiny_model), "--no-progress"])
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 1, log[-3000:]
    assert "--max-failed-fraction 0.1" in log and "not_found" in log
    assert "Traceback" not in log
    assert committed(tmp_path / "out") >= 100  # what finished is kept
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_input_root_confines_paths(tmp_path, tiny_model, corpus):
    clip = corpus / read_jsonl(corpus / "clips.jsonl")[0]["path"]
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.wav").write_bytes(clip.read_bytes())
    os.symlink(clip, root / "escape.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "in", "path": str(root / "in.wav")}, {"id": "escape", "path": str(root / "escape.wav")},
        {"id": "outside", "path": str(clip)}]))
    p = start(["run", str(manifest), "--out", str(tmp_path / "out"), "--model", str(tiny_model), "--no-progress",
               "--input-root", str(root)])
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 3, log
    files = {r["file_id"]: r for r in pads.dataset(tmp_path / "out" / "files").to_table().to_pylist()}
    assert files["in"]["status"] == "ok"
    assert files["escape"]["error_kind"] == files["outside"]["error_kind"] == "outside_input_root"


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (skipped where this process may not mount one)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_stops_the_run_naming_the_part_and_a_rerun_finishes(small_disk, tmp_path, tiny_model, corpus):
    """Before: a traceback of the log file's move (the disk was full for it too), hiding the cause."""
    clips = read_jsonl(corpus / "clips.jsonl")[:30]
    manifest = write_manifest(tmp_path / "m.jsonl", clips, base=corpus)
    (small_disk / "fill").write_bytes(b"\0" * (200 << 10))  # about 56 KiB left: a few parts fit
    args = ["run", str(manifest), "--out", str(small_disk / "out"), "--model", str(tiny_model), "--no-progress",
            "--flush-s", "0.3"]
    log, _ = (p := start(args)).communicate(timeout=600)
    assert p.returncode == 1, log[-3000:]
    assert f"error: cannot write {small_disk / 'out'}/" in log and "No space left on device" in log, log[-3000:]
    assert "rerun the same command" in log and "Traceback" not in log
    (small_disk / "fill").unlink()
    log, _ = (p := start(args)).communicate(timeout=600)
    assert p.returncode == 0 and "already done by an earlier run" in log, log[-3000:]
    ids = pads.dataset(small_disk / "out" / "files", format="parquet").to_table(columns=["file_id"]).column(0)
    assert sorted(ids.to_pylist()) == sorted(c["id"] for c in clips)


def test_retry_failed_does_the_failed_files_again_and_replaces_their_rows(tmp_path, tiny_model, corpus):
    """A mount that was down: two files fail as not_found. A plain rerun keeps them failed (they are done);
    --retry-failed does them again once they are there, and their error rows are replaced, not doubled."""
    clips = read_jsonl(corpus / "clips.jsonl")[:4]
    later = tmp_path / "later"
    rows = clips[:2] + [{"id": f"late{i}", "path": str(later / f"{i}.wav")} for i in range(2)]
    manifest = write_manifest(tmp_path / "m.jsonl", rows, base=corpus)
    args = ["run", str(manifest), "--out", str(tmp_path / "out"), "--model", str(tiny_model), "--no-progress"]
    log, _ = (p := start(args)).communicate(timeout=600)
    assert p.returncode == 3 and "failed (not_found): 2: late0, late1" in log, log[-3000:]
    later.mkdir()
    for i, c in enumerate(clips[2:]):
        shutil.copy(corpus / c["path"], later / f"{i}.wav")
    log, _ = (p := start(args)).communicate(timeout=600)
    assert p.returncode == 3 and "0 processed in this run, 4 already done" in log, log[-3000:]
    log, _ = (p := start([*args, "--retry-failed"])).communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
    assert "2 processed in this run (2 of them failed before, retried), 2 already done" in log
    files = pads.dataset(tmp_path / "out" / "files", format="parquet").to_table(columns=["file_id", "status"])
    assert sorted(files.to_pylist(), key=lambda r: r["file_id"]) == sorted(
        ({"file_id": r["id"], "status": "ok"} for r in rows), key=lambda r: r["file_id"])
