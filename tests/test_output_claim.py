"""One writer per --out: a second run (or plan) into a folder another run is writing stops before it starts.

Before the claim, two runs into one folder both exited 0 with every file's rows twice (50 clips, 100 rows),
and each one's recovery could delete the other's uncommitted parts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from krasr_batch.output import OutputBusy, claim_output
from krasr_batch.output import claim as claim_mod

from .conftest import free_port, read_jsonl, run_cli, s3_out_of_reach, write_manifest

HOLD = """
import sys, time
from krasr_batch.output import claim_output
with claim_output(sys.argv[1], "run"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding ``out``'s claim (returns once it holds it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_claim_on_a_local_folder_is_refused_and_names_the_holder(tmp_path):
    out = tmp_path / "out"
    with claim_output(str(out), "plan"):
        held = json.loads((out / claim_mod.CLAIM_NAME).read_text())
        assert held["pid"] == os.getpid() and held["command"] == "plan"
        with pytest.raises(OutputBusy, match=rf"krasr-batch plan \(pid {os.getpid()} on "):
            with claim_output(str(out)):
                pass
    with claim_output(str(out)):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_no_stale_claim(tmp_path):
    out = tmp_path / "out"
    p = _holder(out)
    try:
        with pytest.raises(OutputBusy, match=rf"pid {p.pid} "):
            with claim_output(str(out)):
                pass
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with claim_output(str(out)):  # the kernel let go of the dead process's lock
        pass


@pytest.mark.parametrize("command", ["run", "plan"])
def test_cli_stops_with_exit_2_and_leaves_the_folder_alone(tmp_path, corpus, tiny_model, command):
    out = tmp_path / "out"
    (out / "files").mkdir(parents=True)
    (out / "files" / "part-keep-000000.parquet").write_bytes(b"kept")  # what --overwrite would delete
    manifest = write_manifest(tmp_path / "m.jsonl", read_jsonl(corpus / "clips.jsonl")[:2], base=corpus)
    p = _holder(out)
    try:
        args = [command, str(manifest), "--out", str(out), "--overwrite", "--no-progress"]
        if command == "run":
            args += ["--model", str(tiny_model)]
        r = run_cli(args, timeout=120)
    finally:
        p.kill()
        p.wait()
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"is being written by krasr-batch run (pid {p.pid} on " in r.stderr and "Traceback" not in r.stderr
    assert (out / "files" / "part-keep-000000.parquet").read_bytes() == b"kept"
    assert not (out / "_work").exists()  # stopped before the settings stamp, the manifest and Ray


@pytest.mark.e2e
def test_two_real_runs_into_one_folder_never_double_rows(tmp_path, corpus, tiny_model):
    rows = read_jsonl(corpus / "clips.jsonl")[:8]
    manifest = write_manifest(tmp_path / "m.jsonl", rows, base=corpus)
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "krasr_batch", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = out / claim_mod.CLAIM_NAME
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_cli(args, timeout=120)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 2 and f"(pid {first.pid} on " in second.stderr, second.stderr[-2000:]
    ids = pads.dataset(out / "files", format="parquet").to_table(columns=["file_id"]).column(0).to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows)
    again = run_cli(args, timeout=300)  # the claim is free once the first ended: a rerun adds nothing
    assert again.returncode == 0 and f"{len(rows)} already done by an earlier run" in again.stdout, again.stderr[-2000:]


# ---------------------------------------------------------------- object storage: a lease (moto's S3)

@pytest.fixture
def s3_out(monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    from krasr_batch import storage

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    storage._filesystem.cache_clear()
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="claims")
    try:
        yield "s3://claims/out", client
    finally:
        storage._filesystem.cache_clear()
        server.stop()


def _lease(client) -> dict | None:
    try:
        return json.loads(client.get_object(Bucket="claims", Key=f"out/{claim_mod.CLAIM_NAME}")["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def test_s3_lease_refuses_a_second_run_is_renewed_and_removed(s3_out, monkeypatch):
    out, client = s3_out
    monkeypatch.setattr(claim_mod, "LEASE_S", 2.0)  # renewed every 0.5 s
    with claim_output(out, "run"):
        first = _lease(client)
        assert first["pid"] == os.getpid()
        with pytest.raises(OutputBusy, match=r"last heard from \d+ s ago"):
            with claim_output(out):
                pass
        time.sleep(1.2)
        assert _lease(client)["heartbeat"] > first["heartbeat"]  # renewed while the run goes on
    assert _lease(client) is None  # a finished run leaves nothing behind


def test_s3_lease_of_a_run_that_is_gone_is_taken_over(s3_out, monkeypatch, caplog):
    out, client = s3_out
    dead = {"command": "run", "host": "node-7", "pid": 4242, "started": "2026-12-01T00:00:00Z", "heartbeat": 0}
    client.put_object(Bucket="claims", Key=f"out/{claim_mod.CLAIM_NAME}", Body=json.dumps(dead).encode())
    with pytest.raises(OutputBusy, match=r"pid 4242 on node-7"):  # just written: live
        with claim_output(out):
            pass
    monkeypatch.setattr(claim_mod, "LEASE_S", 0.5)
    time.sleep(1.0)
    with claim_output(out):
        assert _lease(client)["pid"] == os.getpid()
    assert "taking over the lease of krasr-batch run (pid 4242 on node-7" in caplog.text


def test_a_folder_whose_filesystem_has_no_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some FUSE mounts (bucket mounts) answer flock with ENOLCK or EOPNOTSUPP: the run goes on, and says
    that a second run would not be stopped, rather than failing on a lock it does not need to work."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with claim_output(str(tmp_path / "out")):
        pass
    assert "cannot lock .krasr-batch.lock (No locks available): a second run" in caplog.text


def test_a_claim_that_was_the_only_write_leaves_no_folder(tmp_path):
    """A run refused before it writes anything (a model that does not load) leaves --out as it found it:
    missing when it was missing; a folder that existed, or one the run wrote into, stays."""
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="no model"):
        with claim_output(str(out)):
            raise RuntimeError("no model")
    assert not out.exists()
    with claim_output(str(out)):
        (out / "_work").mkdir()
    assert (out / "_work").is_dir()
    (empty := tmp_path / "empty").mkdir()
    with claim_output(str(empty)):
        pass
    assert empty.is_dir()


def test_object_storage_out_of_reach_stops_the_run_naming_the_output(tmp_path, corpus, tiny_model, monkeypatch):
    """``--out s3://...`` where the storage cannot be reached (here: its endpoint a closed local port) stops
    the run before anything starts with one line naming the output, not a traceback from reading the lease."""
    s3_out_of_reach(monkeypatch)
    manifest = write_manifest(tmp_path / "m.jsonl", read_jsonl(corpus / "clips.jsonl")[:1], base=corpus)
    r = run_cli(["run", str(manifest), "--out", "s3://claims/out", "--model", str(tiny_model), "--no-progress"])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"cannot write s3://claims/out/{claim_mod.CLAIM_NAME}" in r.stderr, r.stderr[-3000:]
