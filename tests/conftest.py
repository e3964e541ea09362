"""Shared test fixtures: models and corpus built once per machine by krasr_batch.testing; the CLI in a subprocess.

No test starts Ray in the pytest process: pipeline runs go through ``run_cli``. With Ray 2.60 an in-process
local Ray and the loopback-cluster tests' in-process connection to a token-authenticated cluster
(test_cluster.py) break each other within one session ("Authentication token is missing or incorrect").

The fixtures live in ``$KRASR_TEST_CACHE`` (default ``~/.cache/krasr-batch-test``): ``models/tiny-random``,
``models/base`` and ``corpus``, each built on first use (see ``krasr_batch.testing``) with a ``BUILT`` marker
written last and a file lock, so a killed build is redone and parallel workers build once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from krasr_batch.testing import default_cache, ensure_corpus, ensure_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = default_cache()
os.environ.setdefault("KRASR_BATCH_CACHE", str(CACHE / "krasr-batch"))  # CTranslate2 conversions of the test models


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return ensure_model("tiny-random", CACHE)


@pytest.fixture(scope="session")
def base_model() -> Path:
    return ensure_model("base", CACHE)


@pytest.fixture(scope="session")
def corpus() -> Path:
    return ensure_corpus(CACHE)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_manifest(path: Path, rows: list[dict], base: Path | None = None) -> Path:
    """Write rows as JSON Lines; relative paths are made absolute against ``base``."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            r = dict(r)
            if base is not None and not os.path.isabs(r["path"]):
                r["path"] = str(base / r["path"])
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def free_port() -> int:
    """A local TCP port nothing listens on (bound, then closed): for a server to start, or a connection refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_out_of_reach(monkeypatch) -> None:
    """Object storage that cannot be reached: S3's endpoint a closed local port, with test credentials and no
    instance-metadata lookup (for this process and the commands it runs)."""
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)


def run_cli(args: list[str], timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``krasr-batch`` command in its own process."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "krasr_batch", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=REPO)


# ---------------------------------------------------------------- the fast lane: pytest -m "not e2e"

# end-to-end tests in files this module does not own (their marks are added here, not in those files)
E2E_ELSEWHERE = {
    "test_bench_smoke.py::test_compare_krasr_and_card_and_refresh_block",  # benchmarks.compare runs krasr-batch
    "test_bench_smoke.py::test_compare_faster_whisper_row",
    "test_bench_smoke.py::test_gpu_check_dry_run_on_cpu",  # benchmarks.gpu_check in subprocesses
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{item.originalname}" in E2E_ELSEWHERE:
            item.add_marker(pytest.mark.e2e)
