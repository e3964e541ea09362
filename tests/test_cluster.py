"""krasr-batch on a real Ray cluster: cluster.yaml, `run --address`, `submit` / `status` / `logs`.

The cluster is laid out like cluster.yaml, on 127.0.0.1: a head with CPU 0 (GCS, dashboard and Jobs API)
and two workers with 2 CPUs each, no GPU and no custom resource, every node started with token
authentication on (RAY_AUTH_MODE=token, a fresh token in a file of the test's own). Each node has its own
temp dir, and each `ray start` runs in its own session, so teardown kills exactly this cluster's processes
(by session id, and anything naming the test's folder) and never other Ray instances on the machine, as
`ray stop --force` would.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest
import yaml

from .conftest import REPO, free_port, read_jsonl, run_cli, write_manifest

CLIPS = ["ru_000", "ru_001", "ru_002", "ru_003", "ru_004", "ru_005", "ru_006", "ru_007"]
MODEL_STAGE = "ModelStage"


# ---------------------------------------------------------------- $RAY_ADDRESS, --address local, a dead address

def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on return: nothing listens there


def test_an_address_where_nothing_answers_is_named_at_once():
    from krasr_batch.cluster import unreachable
    from krasr_batch.settings import ResourceOptions

    port = _dead_port()
    assert unreachable(f"127.0.0.1:{port}") == "Connection refused"
    assert unreachable(f"ray://127.0.0.1:{port}") == "Connection refused"
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        assert unreachable(f"127.0.0.1:{live.getsockname()[1]}") is None
    assert unreachable("auto") is None and unreachable("http://head:8265") is None
    assert ResourceOptions(address=" Local ").address is None  # Ray's spelling of "an embedded Ray"


def test_ray_address_in_the_environment_is_the_cluster_a_run_uses(tmp_path, tiny_model):
    """Ray's convention. Before: the embedded Ray's ray.init() read $RAY_ADDRESS itself and retried a dead
    address for minutes with its messages held back (killed after 300 s with no line printed)."""
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.wav"}\n')
    addr = f"127.0.0.1:{_dead_port()}"
    r = run_cli(["run", str(m), "--out", str(tmp_path / "out"), "--model", str(tiny_model)],
                env={"RAY_ADDRESS": addr}, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"using the Ray cluster at $RAY_ADDRESS ({addr})" in r.stderr
    assert f"error: cannot connect to the Ray cluster at {addr}: nothing answers there" in r.stderr


@pytest.mark.e2e
def test_address_local_runs_an_embedded_ray_whatever_ray_address_says(tmp_path, corpus, tiny_model):
    rows = read_jsonl(corpus / "clips.jsonl")[:2]
    m = write_manifest(tmp_path / "m.jsonl", rows, base=corpus)
    r = run_cli(["run", str(m), "--out", str(tmp_path / "out"), "--model", str(tiny_model), "--address", "local",
                 "--no-progress"], env={"RAY_ADDRESS": f"127.0.0.1:{_dead_port()}"}, timeout=300)
    assert r.returncode == 0 and "2 processed in this run" in r.stdout, r.stderr[-2000:]
    assert "$RAY_ADDRESS" not in r.stderr


# ---------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))  # Ray's own defaults filled in, as `ray up` does
    validate_config(config)  # ray/autoscaler/ray-schema.json, plus Ray's own checks

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["max_workers"] == 0  # nothing runs on the head
    gpu_types = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "an autoscaling GPU worker type"
    for t in gpu_types:
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= config["max_workers"]
        assert t["resources"]["GPU"] == 1 and t["resources"]["CPU"] >= 2  # one model actor per worker, CPUs to spare
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        torch_at = next(i for i, c in enumerate(commands) if "install" in c and " torch" in c)
        krasr_at = next(i for i, c in enumerate(commands) if "krasr-batch" in c)
        assert torch_at < krasr_at  # torch's build chosen before krasr-batch pulls a default one
    assert "download.pytorch.org/whl/cpu" in " ".join(config["head_setup_commands"])
    mounted = {remote: local for remote, local in config["file_mounts"].items()}
    assert any(remote in " ".join(config["worker_setup_commands"]) for remote in mounted)
    # token authentication on every node, the token from the user's home directory (never the repository)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert all("RAY_AUTH_MODE=token" in c for c in commands if "ray start" in c)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert mounted.get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "disabled" not in (REPO / "cluster.yaml").read_text()


# ---------------------------------------------------------------- placement (no cluster needed)

def test_placement_follows_gpus_resources_and_flags():
    from krasr_batch.cluster import plan_placement

    gpu_nodes = [{"CPU": 0}] + [{"CPU": 4, "GPU": 1}] * 3
    p = plan_placement(gpu_nodes, "auto", 0, None)
    assert p.use_gpu and p.actors == 3 and p.ray_args == {"num_gpus": 1, "num_cpus": 1}
    assert plan_placement(gpu_nodes, "auto", 2, None).actors == 2  # --actors wins
    assert not plan_placement(gpu_nodes, "cpu", 0, None).use_gpu
    # an autoscaling GPU group still at zero: --device cuda asks for GPU actors, the autoscaler adds nodes
    p = plan_placement([{"CPU": 0}], "cuda", 4, None)
    assert p.use_gpu and p.actors == 4 and p.ray_args["num_gpus"] == 1 and "no node has a GPU" in p.problem
    # CPU only: a single-threaded replica per CPU of each node, leaving room for the other stages
    p = plan_placement([{"CPU": 8}], "auto", 0, None)
    assert (p.use_gpu, p.actors, p.threads, p.segment_cpus) == (False, 8, 1, 0.5) and p.ray_args["num_cpus"] < 1
    p = plan_placement([{"CPU": 0}, {"CPU": 2}, {"CPU": 2}], "auto", 0, None)
    # room beside the actors for one task of each other stage: decode-and-segment and two repartitions
    assert p.actors == 4 and p.ray_args["num_cpus"] <= (2 - p.segment_cpus - 0.1) / 2
    p = plan_placement([{"CPU": 4}], "auto", 1, None)  # --actors 1: one wide replica
    assert (p.actors, p.threads) == (1, 3)
    # with a custom resource, one per unit, sized to its nodes
    nodes = [{"CPU": 16}, {"CPU": 4, "asr": 2}, {"CPU": 8, "asr": 1}]
    p = plan_placement(nodes, "auto", 0, "asr")
    assert p.actors == 3 and p.ray_args["resources"] == {"asr": 1} and 1 <= p.ray_args["num_cpus"] <= 2
    p = plan_placement([{"CPU": 4, "GPU": 1, "asr": 1}, {"CPU": 4, "GPU": 1, "asr": 1}, {"CPU": 4, "GPU": 1}],
                       "auto", 0, "asr")
    assert p.actors == 2 and p.ray_args == {"num_gpus": 1, "num_cpus": 1, "resources": {"asr": 1}}


def _spreads(n: int, most: list[int]):
    """Every way to put n actors on nodes that hold at most most[i] each."""
    if not most:
        if n == 0:
            yield []
        return
    for k in range(min(n, most[0]) + 1):
        for rest in _spreads(n - k, most[1:]):
            yield [k, *rest]


def _tasks_fit(free: list[float], tasks: list[float]) -> bool:
    """One task of each size, all at once, somewhere on the nodes (tried every way)."""
    if not tasks:
        return True
    return any(f >= tasks[0] - 1e-9 and _tasks_fit([*free[:i], f - tasks[0], *free[i + 1:]], tasks[1:])
               for i, f in enumerate(free))


NODE_SHAPES = {
    "CPU-0 head, 1-CPU workers": [{"CPU": 0}, {"CPU": 1}, {"CPU": 1}, {"CPU": 1}],
    "CPU-0 head, 2-CPU workers": [{"CPU": 0}, {"CPU": 2}, {"CPU": 2}],
    "CPU-0 head, 16-CPU workers": [{"CPU": 0}, {"CPU": 16}, {"CPU": 16}],
    "CPU-0 head, 4-CPU GPU workers": [{"CPU": 0}, {"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}],
    "a mix": [{"CPU": 0}, {"CPU": 1}, {"CPU": 2}, {"CPU": 4}, {"CPU": 16}],
    "a mix with a GPU": [{"CPU": 0}, {"CPU": 1}, {"CPU": 2}, {"CPU": 4, "GPU": 1}],
    "one 2-CPU machine": [{"CPU": 2}],
}


@pytest.mark.parametrize("shape", sorted(NODE_SHAPES))
@pytest.mark.parametrize("device,actors", [("auto", 0), ("cpu", 0), ("auto", 1), ("auto", 3)])
def test_placement_fits_every_stage_on_any_spread_of_the_actors(shape, device, actors):
    """However Ray spreads the model actors, they all run, and one task of every other stage runs too."""
    from krasr_batch.cluster import fits, plan_placement

    nodes = NODE_SHAPES[shape]
    if device == "auto" and actors > sum(nd.get("GPU", 0) for nd in nodes) > 0:
        pytest.skip("more GPU actors than GPUs wait for an autoscaler's nodes")
    p = plan_placement(nodes, device, actors, None)
    assert p.problem is None and fits(nodes, p)
    req = p.actor_request()
    tasks = sorted((r["CPU"] for r in p.task_requests().values()), reverse=True)
    # the manifest is read by the driver (no task); none asks for Ray Data's default whole CPU
    assert len(tasks) == 3 and all(0 < t <= 1 for t in tasks)

    def most(nd):  # actors a node can hold by its resources
        k = int(nd.get("CPU", 0) // req["CPU"] + 1e-9) if req["CPU"] else p.actors
        return min(k, int(nd.get("GPU", 0)) if "GPU" in req else k)

    spreads = list(_spreads(p.actors, [most(nd) for nd in nodes]))
    assert spreads, f"{p.actors} actors of {req} do not fit on {nodes}"
    for spread in spreads:
        free = [nd.get("CPU", 0) - k * req["CPU"] for nd, k in zip(nodes, spread)]
        assert _tasks_fit(free, tasks), (shape, spread, req, tasks)


# ---------------------------------------------------------------- a two-node local cluster

def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cluster_pids(sessions: set[int], marker: str) -> list[int]:
    """Processes of this cluster: in a `ray start` session, or naming the test's folder (a job's driver)."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        if _session_of(pid) in sessions or marker in _cmdline(pid):
            pids.append(pid)
    return pids


def _kill_cluster(sessions: set[int], marker: str) -> None:
    for _ in range(5):
        pids = _cluster_pids(sessions, marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(1.0)
    left = _cluster_pids(sessions, marker)
    assert not left, f"cluster processes survived teardown: {left}"


@dataclass
class Cluster:
    address: str  # GCS, for `run --address`
    dashboard: str  # Jobs API, for `submit --address`
    base: Path  # everything of this test lives under it
    token_file: Path  # the cluster's token
    workers: set[str]  # node ids of the two 2-CPU workers

    def env(self, **extra: str) -> dict[str, str]:
        """A client's environment: the token found through RAY_AUTH_TOKEN_PATH only (RAY_AUTH_MODE unset,
        as a user's shell would have it); ``extra`` overrides."""
        e = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
        e.update({"RAY_AUTH_TOKEN_PATH": str(self.token_file), **extra})
        return {k: v for k, v in e.items() if v != ""}  # "": unset


def _ray_start(args: list[str], sessions: set[int], env: dict) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    sessions.add(proc.pid)  # the session leader: everything this node starts stays in its session
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")


def _nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]


def _run_client(cluster: Cluster, args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "krasr_batch", *args], capture_output=True, text=True,
                          timeout=timeout, env=cluster.env(**env), cwd=REPO)


@pytest.fixture(scope="module")
def cluster():
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip("the dashboard and Jobs API need ray[default]")
    import secrets

    base = Path(tempfile.mkdtemp(prefix="krc-", dir="/tmp"))  # short: Ray's socket paths live under it
    token_file = base / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    sessions: set[int] = set()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1")
    port, dash_port = free_port(), free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-gpus=0", "--object-store-memory=200000000"]
    try:
        _ray_start(["--head", f"--port={port}", *common, "--num-cpus=0", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                    f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                    f"--temp-dir={base}/head"], sessions, env)
        for w in ("w1", "w2"):
            _ray_start([f"--address=127.0.0.1:{port}", *common, "--num-cpus=2",
                        f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={base}/{w}"], sessions, env)
        dashboard = f"http://127.0.0.1:{dash_port}"
        from krasr_batch.cluster import use_cluster_token

        mode_before = os.environ.get("RAY_AUTH_MODE")
        os.environ.update(RAY_AUTH_TOKEN_PATH=str(token_file))  # the state API calls of this process
        use_cluster_token()
        deadline = time.time() + 90
        while len(nodes := _nodes(dashboard)) < 3:
            assert time.time() < deadline, "the worker nodes did not join"
            time.sleep(1)
        workers = {n.node_id for n in nodes if n.resources_total.get("CPU")}
        assert len(workers) == 2
        yield Cluster(f"127.0.0.1:{port}", dashboard, base, token_file, workers)
    finally:
        # this process goes back to Ray's own authentication settings: later tests' subprocesses (run_cli copies
        # os.environ) and any Ray call left in this process must not look for this cluster's token, deleted below
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        if "mode_before" in locals():
            if mode_before is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = mode_before
            from ray._raylet import Config

            Config.initialize("")
        _kill_cluster(sessions, str(base))
        shutil.rmtree(base, ignore_errors=True)


def _manifest(corpus: Path, dest: Path, relative: bool = False) -> tuple[Path, list[str]]:
    """A few clips; with ``relative``, paths relative to ``dest``'s folder and one line without an id."""
    by_id = {r["id"]: r for r in read_jsonl(corpus / "clips.jsonl")}
    rows = [dict(by_id[i]) for i in CLIPS]
    if not relative:
        return write_manifest(dest, rows, base=corpus), [r["id"] for r in rows]
    for r in rows:
        r["path"] = os.path.relpath(corpus / r["path"], dest.parent)
    del rows[-1]["id"]  # its id defaults to the path as written here, also once submitted
    return write_manifest(dest, rows), [r.get("id", r["path"]) for r in rows]


def _assert_complete(out: Path, ids: list[str]) -> None:
    assert (out / "_SUCCESS").exists()
    files = pads.dataset(out / "files", format="parquet").to_table(columns=["file_id", "status"]).to_pylist()
    assert sorted(f["file_id"] for f in files) == sorted(ids)
    assert all(f["status"] == "ok" for f in files), files
    con = duckdb.connect()
    assert con.execute(f"select count(*), count(distinct file_id) from '{out}/files/*.parquet'").fetchall() == [
        (len(ids), len(ids))]
    assert con.execute(f"select count(distinct file_id) from '{out}/segments/*.parquet'").fetchall() == [(len(ids),)]


def _model_actor_nodes(dashboard: str, job_id: str | None = None) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, detail=True, limit=1000, raise_on_missing_output=False)
    return {a.node_id for a in actors if MODEL_STAGE in a.class_name and (job_id is None or a.job_id == job_id)}


@pytest.mark.e2e
def test_run_with_address_on_a_cpu0_head_and_two_2cpu_workers(cluster, corpus, tiny_model):
    """The layout that used to wait forever: the actors hold most of both workers' CPUs, every other
    stage still runs beside them; the token comes from RAY_AUTH_TOKEN_PATH with RAY_AUTH_MODE unset."""
    manifest, ids = _manifest(corpus, cluster.base / "run.jsonl")
    out = cluster.base / "out-run"
    r = _run_client(cluster, ["run", str(manifest), "--out", str(out), "--model", str(tiny_model),
                              "--address", cluster.address, "--no-progress", "--stall-timeout", "240"], timeout=480)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _assert_complete(out, ids)  # every manifest line exactly once
    assert _model_actor_nodes(cluster.dashboard) == cluster.workers  # two on each worker, none on the head


@pytest.mark.e2e
def test_a_wrong_or_missing_token_is_refused_in_one_line(cluster, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "path": "s3://bucket/a.wav"}])
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    cases = {
        "wrong token, run": (["run", str(manifest), "--out", str(tmp_path / "o"), "--address", cluster.address],
                             {"RAY_AUTH_TOKEN": "0" * 64}),
        "wrong token, status": (["status", "raysubmit_x", "--address", cluster.dashboard],
                                {"RAY_AUTH_TOKEN": "0" * 64}),
        "no token, submit": (["submit", str(manifest), "--out", "s3://b/o", "--address", cluster.dashboard],
                             {"RAY_AUTH_TOKEN_PATH": "", "HOME": str(empty_home)}),
        "no token, logs": (["logs", "raysubmit_x", "--address", cluster.dashboard],
                           {"RAY_AUTH_TOKEN_PATH": "", "HOME": str(empty_home)}),
    }
    for name, (args, env) in cases.items():
        r = _run_client(cluster, args, timeout=180, **env)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (name, r.stderr[-3000:])
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr[-3000:])
        assert "refused the authentication token" in lines[0] and "~/.ray/auth_token" in lines[0], name
        assert "RAY_AUTH_TOKEN_PATH" in lines[0] and "RAY_AUTH_TOKEN," in lines[0], name
    assert not (tmp_path / "o" / "_SUCCESS").exists()


SHIPPED_PROBE = """
import json, os, sys, ray
from krasr_batch.pipeline.orchestrate import _init_ray
from krasr_batch.settings import build_settings
_init_ray(build_settings({"address": sys.argv[1], "ship_code": sys.argv[2] == "1"}))

@ray.remote(num_cpus=0.01)  # on a worker: the head has no CPU
def probe():
    import krasr_batch
    return [krasr_batch.__file__, os.environ.get("AWS_ENDPOINT_URL")]

print(json.dumps(ray.get(probe.remote())))
"""


@pytest.mark.e2e
@pytest.mark.parametrize("ship", [True, False])
def test_run_with_address_ships_its_own_code(cluster, ship):
    env = cluster.env(AWS_ENDPOINT_URL="http://storage.example:9000")
    r = subprocess.run([sys.executable, "-c", SHIPPED_PROBE, cluster.address, "1" if ship else "0"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=cluster.base)
    assert r.returncode == 0, r.stderr[-3000:]
    where, endpoint = json.loads(r.stdout.strip().splitlines()[-1])
    installed = str(REPO / "krasr_batch" / "__init__.py")
    if ship:  # the workers import the copy Ray unpacked from py_modules, not the one installed on the node
        assert "runtime_resources" in where and where != installed
    else:
        assert where == installed
    assert endpoint == "http://storage.example:9000"  # object-storage location travels with the run


@pytest.mark.e2e
def test_submit_status_logs(cluster, corpus, tiny_model):
    (cluster.base / "submit").mkdir()
    manifest, ids = _manifest(corpus, cluster.base / "submit" / "m.jsonl", relative=True)
    out = cluster.base / "out-submit"
    r = _run_client(cluster, ["submit", str(manifest), "--out", str(out), "--model", str(tiny_model),
                              "--address", cluster.dashboard], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    assert "local path" in r.stderr  # --out and the audio are local: the user is told they must be shared

    deadline, state = time.time() + 180, ""
    while time.time() < deadline:
        s = _run_client(cluster, ["status", job_id, "--address", cluster.dashboard], timeout=60)
        assert s.returncode == 0, s.stderr[-2000:]
        state = s.stdout.split("\t")[1].split()[0]
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = _run_client(cluster, ["logs", job_id, "--address", cluster.dashboard], timeout=60)
    assert state == "SUCCEEDED", logs.stdout[-4000:]
    assert "--address auto" in s.stdout  # the entrypoint it ran
    assert "\texit 0" in s.stdout  # the run's own exit status, as Ray recorded it
    assert f"krasr-batch: {len(ids)} files in the manifest" in logs.stdout
    assert _run_client(cluster, ["status", job_id, "--wait", "--address", cluster.dashboard], timeout=60).returncode == 0
    follow = _run_client(cluster, ["logs", job_id, "--follow", "--address", cluster.dashboard], timeout=60)
    assert follow.returncode == 0 and f"ok {len(ids)}, failed 0" in follow.stdout
    _assert_complete(out, ids)  # ids as in the local manifest, also the one that defaulted to its path
    job = next(j for j in _jobs(cluster.dashboard) if j.submission_id == job_id)
    assert _model_actor_nodes(cluster.dashboard, job.job_id) == cluster.workers


def _jobs(dashboard: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).list_jobs()


@pytest.mark.e2e
def test_submit_checks_the_manifest_before_submitting(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.wav"}\n{"id": 3\n')
    r = run_cli(["submit", str(bad), "--out", "s3://bucket/out", "--address", "http://127.0.0.1:9"], timeout=60)
    assert r.returncode == 2 and "line 2" in r.stderr



def test_submit_rebuilds_the_run_command_and_ships_what_is_local(monkeypatch):
    """The entrypoint carries exactly the run options given; a --job preset and a local manifest travel along."""
    from click.testing import CliRunner

    from krasr_batch.cli import cluster as cli_cluster
    from krasr_batch.cli import main

    sent: dict = {}

    class FakeClient:
        def submit_job(self, **kwargs):  # the working dir still exists while submitting
            workdir = Path(kwargs["runtime_env"]["working_dir"])
            sent.update(kwargs, files=sorted(os.listdir(workdir)),
                        preset=yaml.safe_load((workdir / "job.yaml").read_text()),
                        manifest=read_jsonl(workdir / "manifest.jsonl"))
            return "raysubmit_test"

    monkeypatch.setattr(cli_cluster, "_client", lambda address: FakeClient())
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000")
    r = CliRunner().invoke(main, [
        "submit", "--job", str(REPO / "jobs" / "demo.yaml"), "--out", "s3://b/out", "--beams", "2",
        "--no-token-limit", "--max-segment-s", "20.5", "--no-progress", "--actor-resource", "asr",
        "--address", "http://head:8265"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == "raysubmit_test"
    assert sent["entrypoint"].split() == [
        "python", "-m", "krasr_batch.cli", "run", "manifest.jsonl", "--out", "s3://b/out", "--address", "auto",
        "--job", "job.yaml", "--beams", "2", "--no-token-limit", "--max-segment-s", "20.5", "--no-progress",
        "--actor-resource", "asr"]
    assert sent["files"] == ["job.yaml", "manifest.jsonl"]
    assert sent["preset"] == {"beams": 3, "language": "kazakh", "model": "KRASR/kazakh-russian-asr-whisper-small-full-ft"}
    env = sent["runtime_env"]
    assert env["py_modules"] == [str(REPO / "krasr_batch")]
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://minio.local:9000"}
    original = read_jsonl(REPO / "jobs" / "demo" / "manifest.jsonl")
    assert [m["id"] for m in sent["manifest"]] == [o.get("id", o["path"]) for o in original]
    assert [m["path"] for m in sent["manifest"]] == [str(REPO / "jobs" / "demo" / o["path"]) for o in original]


def test_a_small_jobs_model_blocks_are_bounded_from_its_headers(tmp_path):
    """How many replicas a small local job can keep busy (orchestrate.model_blocks_bound): clips are one
    window each, a long recording at most 2 * ceil(duration / 30) + 1, four files a decode-and-segment task."""
    import soundfile as sf

    from krasr_batch.pipeline.orchestrate import model_blocks_bound
    from krasr_batch.settings import SegmentOptions

    def wav(name, seconds):
        path = tmp_path / name
        sf.write(path, np.zeros(int(seconds * 16000), np.float32), 16000, format="FLAC")
        return str(path)

    opts = SegmentOptions()
    clips = [wav(f"c{i}.flac", 5) for i in range(17)]
    assert model_blocks_bound(clips[:3], opts, 16) == 1  # the demo: 6 rows, one block, one replica
    assert model_blocks_bound(clips, opts, 16) == 5  # 4 + 4 + 4 + 4 + 1 files, a block each
    long = [wav(f"l{i}.flac", 480) for i in range(3)]  # 2 * 16 + 1 windows + the file row: 34 rows each
    assert model_blocks_bound(long, opts, 16) == 7
    assert model_blocks_bound(long, SegmentOptions(max_segment_s=10), 16) == 19  # 98 rows each, 294 in all
    for odd in (str(tmp_path / "missing.wav"), "s3://bucket/a.wav", str(tmp_path / "shard.parquet") + "#row=3"):
        assert model_blocks_bound([*clips[:3], odd], opts, 16) is None  # no header to read here: no bound
    assert model_blocks_bound(clips[:3], opts, 16, input_root=str(tmp_path / "elsewhere")) is None
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    assert model_blocks_bound([str(tmp_path / "junk.wav")], opts, 16) is None


def test_a_work_bound_caps_only_the_default_cpu_replicas():
    """plan_placement's work_bound (a small job's model blocks): default CPU replicas are no more than the blocks,
    as wide as --actors would make them; --actors, GPUs and a larger bound are left alone."""
    from krasr_batch.cluster import plan_placement

    two = [{"CPU": 2}]
    assert plan_placement(two, "auto", 0, None).actors == 2
    assert plan_placement(two, "auto", 0, None, work_bound=1) == plan_placement(two, "auto", 1, None)
    assert plan_placement(two, "auto", 0, None, work_bound=0) == plan_placement(two, "auto", 1, None)
    assert plan_placement(two, "auto", 0, None, work_bound=2) == plan_placement(two, "auto", 0, None)
    sixteen = [{"CPU": 16}]
    assert plan_placement(sixteen, "auto", 0, None, work_bound=5).actors == 5
    assert plan_placement(sixteen, "auto", 0, None, work_bound=5).threads > 1  # fewer, wider
    assert plan_placement(sixteen, "auto", 8, None, work_bound=1).actors == 8  # --actors wins
    gpus = [{"CPU": 8, "GPU": 2}]
    assert plan_placement(gpus, "auto", 0, None, work_bound=1) == plan_placement(gpus, "auto", 0, None)


def test_node_memory_caps_only_the_default_cpu_replicas():
    """plan_placement's replica_bytes (a CPU replica's peak): default CPU replicas are no more than each node's
    Ray ``memory`` resource holds, as wide as --actors would make them, and with a small job's bound the
    smaller wins; nodes that do not report memory, --actors and GPUs are left alone."""
    from krasr_batch.cluster import fits, memory_bound_actors, plan_placement

    gib = 2**30
    laptop = [{"CPU": 8, "memory": 11 * gib}]  # 16 GB, less Ray's object store
    place = plan_placement(laptop, "auto", 0, None, replica_bytes=int(3.5 * gib))
    three = plan_placement(laptop, "auto", 3, None)
    assert place.actors == 3 and place.threads == three.threads == 2  # fewer, wider
    assert place.actor_request() == {**three.actor_request(), "memory": float(int(3.5 * gib))}
    assert "memory" not in plan_placement(laptop, "auto", 6, None, replica_bytes=gib).actor_request()  # --actors
    assert "'memory': '3.50 GiB'" in place.describe()
    assert plan_placement(laptop, "auto", 0, None, replica_bytes=gib).actors == 8  # room for one per CPU
    assert plan_placement(laptop, "auto", 0, None, replica_bytes=20 * gib).actors == 1  # never none
    assert plan_placement(laptop, "auto", 0, None, replica_bytes=int(3.5 * gib), work_bound=2).actors == 2
    assert plan_placement(laptop, "auto", 6, None, replica_bytes=int(3.5 * gib)).actors == 6  # --actors wins
    assert plan_placement([{"CPU": 8}], "auto", 0, None, replica_bytes=20 * gib).actors == 8  # no memory known
    mixed = [{"CPU": 16, "memory": 30 * gib}, {"CPU": 4, "memory": 60 * gib}, {"CPU": 0.5}]
    assert memory_bound_actors(mixed, 7 * gib) == 4 + 4  # each node: its CPUs or its memory, the fewer
    place = plan_placement(mixed, "auto", 0, None, replica_bytes=7 * gib)
    assert place.actors == 8 and fits(mixed, place)
    # Ray places actors by what they ask for: asking for CPUs alone (2.29 each, before), up to 7 of the 8
    # could land on the first node, 49 GiB of replicas on 30; asking for memory too, at most 4 do
    req = place.actor_request()
    per_node = [int(min(nd.get("CPU", 0) // req["CPU"], nd.get("memory", 0) // req.get("memory", 1)))
                for nd in mixed]
    assert req.get("memory") == 7 * gib and per_node[0] == 4 and sum(per_node) >= 8
    gpus = [{"CPU": 8, "GPU": 2, "memory": 4 * gib}]
    assert plan_placement(gpus, "auto", 0, None, replica_bytes=20 * gib) == plan_placement(gpus, "auto", 0, None)


def test_the_driver_estimates_a_replica_from_the_models_config(tiny_model, monkeypatch):
    """orchestrate.cpu_replica_bytes: from a local folder's config.json, larger for the ctranslate2 engine
    than for torch; a hub id that cannot be read offline gives None (one replica per CPU, as before)."""
    from krasr_batch.pipeline.orchestrate import cpu_replica_bytes
    from krasr_batch.settings import DecodeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch_bytes = cpu_replica_bytes(DecodeOptions(model=str(tiny_model), engine="torch"))
    assert 0 < torch_bytes < cpu_replica_bytes(DecodeOptions(model=str(tiny_model), engine="ctranslate2"))
    assert cpu_replica_bytes(DecodeOptions(model="no-such-org/no-such-model", engine="torch")) is None


def test_a_replicas_memory_estimate_covers_what_was_measured():
    """engines.base.replica_memory_bytes against the peaks benchmarks/replica_memory.py measured over three
    shapes (16 windows decoded to at most 360 tokens, 1 with transformers; BENCHMARKS.md, "A replica's memory,
    refitted (stop 45)"): at or above each; for the KRASR model's shape by at most a fifth above the highest of
    the two CPUs'; larger with batch, beams and float32. Before, a whisper-base replica peaked 28 % above its estimate, and one of next to no
    weights at nearly twice it (the runtime was taken as 256 MiB)."""
    from krasr_batch.engines.base import replica_memory_bytes, whisper_parameters

    def shape(d, layers, ffn):
        return {"d_model": d, "vocab_size": 51865, "encoder_layers": layers, "decoder_layers": layers,
                "encoder_ffn_dim": ffn, "decoder_ffn_dim": ffn, "num_mel_bins": 80,
                "max_source_positions": 1500, "max_target_positions": 448}

    small, base, tiny = shape(768, 12, 3072), shape(512, 6, 2048), shape(64, 2, 128)
    assert abs(whisper_parameters(small) - 241_734_912) < 1_000_000  # whisper-small, tied output projection
    mib = 2**20
    measured = {  # (engine, dtype, windows a call): peaks in MiB, on the AMD EPYC (stop 45) and Sapphire Rapids (stop 34)
        ("torch", "bfloat16", 16): {"small": (3392, 3314), "base": (1688,), "tiny": (565,)},
        ("torch", "float32", 16): {"small": (4770,), "base": (2544,), "tiny": (603,)},
        ("ctranslate2", "float32", 16): {"small": (5048, 5267), "base": (1604,), "tiny": (567,)},
        ("transformers", "float32", 1): {"small": (3259, 2592), "base": (1207,), "tiny": (634,)},
    }
    configs = {"small": small, "base": base, "tiny": tiny}
    for (engine, dtype, batch), peaks in measured.items():
        for name, values in peaks.items():
            est = replica_memory_bytes(configs[name], engine, batch, 3, dtype) / mib
            assert max(values) <= est, (engine, dtype, name, est, values)
            if name == "small":
                assert est <= 1.2 * max(values), (engine, dtype, name, est, values)
    assert replica_memory_bytes(small, "torch", 8, 3) < replica_memory_bytes(small, "torch", 16, 3)
    assert replica_memory_bytes(small, "torch", 16, 1) < replica_memory_bytes(small, "torch", 16, 3)
    assert replica_memory_bytes(small, "torch", 16, 3) < replica_memory_bytes(small, "torch", 16, 3, "float32")


# ---------------------------------------------------------------- a run that cannot be placed

@pytest.mark.e2e
def test_a_run_that_cannot_be_placed_stops_naming_what_is_missing(corpus, tiny_model, tmp_path):
    """Model actors that need a resource no node has: the run stops after --stall-timeout (embedded Ray)."""
    manifest, ids = _manifest(corpus, tmp_path / "m.jsonl")
    r = run_cli(["run", str(manifest), "--out", str(tmp_path / "out"), "--model", str(tiny_model),
                 "--num-cpus", "2", "--actor-resource", "nowhere", "--stall-timeout", "20"], timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cannot place" in last and "nowhere: 1" in last, last
    assert "--actor-resource" in last and "Finished files are kept" in last
    assert "STALLED" in r.stderr  # the progress line said so before the run stopped
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_stall_watch_reports_only_what_no_node_can_place():
    from krasr_batch.cluster import ClusterDemand, Demand, unplaceable
    from krasr_batch.pipeline import RunStalled
    from krasr_batch.pipeline.watch import StallWatch

    free = [{"CPU": 0.0}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert unplaceable([Demand({"CPU": 1.0}, 3), Demand({"CPU": 0.25}, 2)], free) == [Demand({"CPU": 1.0}, 3)]
    state = {"launching": False}
    read = lambda: ClusterDemand([Demand({"CPU": 1.0}, 3)], free, state["launching"])  # noqa: E731
    watch = StallWatch(300, None, read=read)
    t0 = watch.last_progress
    assert watch.check(t0 + 5) is None  # too early to ask
    assert watch.check(t0 + 60) is None  # stuck, but not for long
    notice = watch.check(t0 + 125)
    assert notice and "{CPU: 1} x3" in notice
    watch.progress(t0 + 130)  # something came back: not stalled
    assert watch.check(t0 + 135) is None
    state["launching"] = True  # an autoscaler is starting nodes: waiting is expected
    assert watch.check(t0 + 500) is None
    state["launching"] = False
    watch.check(t0 + 600)
    with pytest.raises(RunStalled, match=r"cannot place \{CPU: 1\} x3 on any node.*fewer --actors"):
        watch.check(t0 + 700)
    assert StallWatch(0, None, read=read).check(t0 + 10**6) is not None  # 0: reports, never stops
    # a CPU model actor that asks for memory no node has free: the request and each node's free memory in
    # GiB, and what to change
    gib = 2**30
    free = [{"CPU": 4.0, "memory": 2.5 * gib, "object_store_memory": gib}]
    read = lambda: ClusterDemand([Demand({"CPU": 1.0, "memory": 3.5 * gib}, 2)], free, False)  # noqa: E731
    watch = StallWatch(300, None, read=read)
    t0 = watch.last_progress
    watch.check(t0 + 600)
    with pytest.raises(RunStalled, match=r"cannot place \{CPU: 1, memory: 3.50 GiB\} x2 on any node \(free per "
                                         r"node: CPU 4, memory 2.50 GiB\)\..*more free memory.*set --actors"):
        watch.check(t0 + 700)


def test_an_abandoned_feed_closes_its_iterator_before_the_driver_goes_on():
    """A run that stops early (too many failures, an interrupt) shuts Ray down next; the feed's thread must
    have closed Ray Data's iterator first: Ray ends the process, silently, with status 1, when a thread calls
    into it after its shutdown. A stand-in dataset whose iterator notes when it is closed."""
    import threading
    import time

    from krasr_batch.pipeline.watch import Feed

    closed = threading.Event()

    class Batches:
        def iter_batches(self, **kw):
            try:
                for i in range(10_000):
                    time.sleep(0.02)
                    yield i
            finally:
                time.sleep(0.2)  # the executor's shutdown takes a while
                closed.set()

    feed = Feed(Batches(), tick_s=0.05)
    got = [b for b, _ in zip((b for b in feed if b is not None), range(3))]
    assert got == [0, 1, 2]
    feed.abandon(5.0)
    assert closed.is_set() and not feed.thread.is_alive()


def test_an_abandoned_feed_stuck_in_its_iterator_shuts_down_the_executor_it_started(monkeypatch):
    """A stalled run: the feed's thread waits inside Ray Data's iterator for an actor that cannot be placed, so
    telling it to stop does nothing; abandon must shut down the executor (a thread of Ray Data's) that the feed
    started, and no other, before Ray shuts down (left running, a stalled run ended in SIGSEGV). Stand-ins for
    Ray Data's StreamingExecutor and for a dataset whose iterator waits until its executor is shut down."""
    import threading

    import ray.data._internal.execution.streaming_executor as streaming

    from krasr_batch.pipeline.watch import Feed

    class Executor(threading.Thread):
        def __init__(self):
            super().__init__(daemon=True)
            self.ended = threading.Event()

        def run(self):
            self.ended.wait()

        def shutdown(self, force: bool, exception=None):
            self.ended.set()

    monkeypatch.setattr(streaming, "StreamingExecutor", Executor)
    callers = Executor()  # a dataset of the caller's own, running before the feed started
    callers.start()
    started = threading.Event()
    mine: list[Executor] = []

    class Stalled:
        def iter_batches(self, **kw):
            ex = Executor()
            ex.start()
            mine.append(ex)
            started.set()
            ex.ended.wait()  # no batch until the executor ends, as when its actors cannot be placed
            return iter(())

    feed = Feed(Stalled(), tick_s=0.05)
    assert started.wait(10)
    feed.abandon(0.0)
    assert not feed.thread.is_alive() and mine[0].ended.is_set()
    assert not callers.ended.is_set()
    callers.shutdown(force=True)
