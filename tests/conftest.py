"""Shared test fixtures: models and corpus built once per machine from ../shared, one Ray per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KRASR_SHARED", REPO.parent / "shared"))
CACHE = Path(os.environ.get("KRASR_TEST_CACHE", Path.home() / ".cache" / "krasr-batch-test"))
os.environ.setdefault("KRASR_BATCH_CACHE", str(CACHE / "krasr-batch"))  # CTranslate2 conversions of the test models


def _build_model(variant: str) -> Path:
    out = CACHE / "models" / variant
    if not (out / "BUILT").exists():
        subprocess.run([sys.executable, str(SHARED / "models" / "build_whisper.py"), variant, str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return _build_model("tiny-random")


@pytest.fixture(scope="session")
def base_model() -> Path:
    return _build_model("base")


@pytest.fixture(scope="session")
def corpus() -> Path:
    out = CACHE / "corpus"
    if not (out / "bad.jsonl").exists():
        if out.exists():
            shutil.rmtree(out)
        subprocess.run([sys.executable, str(SHARED / "corpus" / "make_corpus.py"), str(out)], check=True)
    return out


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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the tests that call the pipeline in-process."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


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
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{item.originalname}" in E2E_ELSEWHERE:
            item.add_marker(pytest.mark.e2e)
