"""Running on a Ray cluster: the runtime environment a run hands to Ray, and where the model actors go.

Used by ``pipeline`` (``krasr-batch run --address``) and by ``cli_cluster`` (``krasr-batch submit``), so that
a run connected from a shell on the head node and a run handed over as a Ray job see the same code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import krasr_batch
from krasr_batch.storage import location_env

log = logging.getLogger(__name__)

# Set by Ray's job manager in the driver of a submitted job; that job's runtime_env already applies to
# every task and actor of the run (Ray refuses a second one that repeats its fields).
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_SHIP_EXCLUDES = ["__pycache__", "*.pyc"]


def package_dir() -> str:
    """The folder of the ``krasr_batch`` package this process runs (what ``py_modules`` ships)."""
    return os.path.dirname(os.path.abspath(krasr_batch.__file__))


def inside_ray_job() -> bool:
    """True in the driver of a job submitted through Ray's Jobs API."""
    return _RAY_JOB_CONFIG_ENV in os.environ


def code_runtime_env(ship_code: bool) -> dict[str, Any]:
    """The runtime_env that makes the cluster's workers run this process's code and storage settings.

    ``py_modules`` ships the ``krasr_batch`` package itself (not its dependencies: torch, transformers,
    ray[data], ... must be installed on the nodes, see cluster.yaml); Ray puts it first on the workers'
    ``sys.path``, so it wins over a krasr-batch installed there. ``env_vars`` carries the object-storage
    *location* variables (endpoint, region; never credentials: nodes use their own, e.g. an instance profile).
    """
    env: dict[str, Any] = {}
    if ship_code:
        env["py_modules"] = [package_dir()]
        env["excludes"] = list(_SHIP_EXCLUDES)
    loc = location_env()
    if loc:
        env["env_vars"] = loc
    return env


def driver_runtime_env(ship_code: bool) -> dict[str, Any] | None:
    """What ``ray.init(address=...)`` gets: None inside a submitted job (its own runtime_env applies)."""
    if inside_ray_job():
        return None
    return code_runtime_env(ship_code) or None


@dataclass(frozen=True)
class Placement:
    """Where and how wide the model stage runs."""

    use_gpu: bool
    actors: int
    ray_args: dict[str, Any]  # num_gpus / num_cpus / resources for map_batches
    threads: int | None  # torch threads per CPU actor
    segment_cpus: float = 1.0  # Ray CPUs each decode-and-segment task asks for


MAX_CPU_ACTORS = 32
SEGMENT_CPUS_ON_CPU_CLUSTER = 0.5  # decode + VAD is a small fraction of CPU decoding work


def plan_placement(cluster: dict[str, float], nodes: list[dict[str, float]], device: str, actors: int,
                   actor_resource: str | None) -> Placement:
    """Model-actor placement from the cluster's resources (``ray.cluster_resources()`` and each alive node's).

    - GPUs present (or ``device="cuda"``, e.g. an autoscaling GPU group still at zero): one actor per GPU,
      each with ``num_gpus=1``, so actors only land on GPU nodes; ``actors`` (>0) overrides the count.
    - no GPUs: CPU actors; by default one single-threaded replica per CPU (up to 32), which measured
      2.7x the throughput of one replica with two threads on a 2-core machine (beam search's small
      matrices do not scale over threads; see BENCHMARKS.md). The actors' Ray CPUs are fractional so that
      the manifest read and the decode-and-segment tasks (0.5 CPU each) always find room. With ``actor_resource``: one per unit,
      each with the CPUs of its node shared out.
    - ``actor_resource``: each actor also needs one unit of that custom Ray resource, so actors land only on
      nodes started with it (``ray start --resources='{"asr": 1}'``).
    """
    gpus = int(cluster.get("GPU", 0))
    cpus = int(cluster.get("CPU", 0))
    use_gpu = device == "cuda" or (gpus > 0 and device != "cpu")
    extra = {"resources": {actor_resource: 1}} if actor_resource else {}
    units = int(cluster.get(actor_resource, 0)) if actor_resource else 0
    if use_gpu:
        default = gpus if gpus > 0 else 1
        if actor_resource and units:
            default = min(default, units)
        return Placement(True, actors or default, {"num_gpus": 1, "num_cpus": 1, **extra}, None, 1.0)
    if actor_resource:
        n = actors or max(units, 1)
        hosts = [nd for nd in nodes if nd.get(actor_resource, 0) >= 1]
        # the smallest host decides: every actor must fit on any node that has the resource
        per_node = [max(1, int(nd.get("CPU", 1)) // max(1, min(int(nd[actor_resource]), n))) for nd in hosts]
        per_actor = min(per_node) if per_node else 1
        return Placement(False, n, {"num_cpus": per_actor, **extra}, per_actor, SEGMENT_CPUS_ON_CPU_CLUSTER)
    n = actors or max(1, min(cpus, MAX_CPU_ACTORS))
    reserve = 1.0 if cpus <= 8 else cpus / 8  # room for the manifest read and the segment tasks
    share = max(0.1, (cpus - reserve) / n)
    return Placement(False, n, {"num_cpus": round(share, 3), **extra}, max(1, round(share)),
                     SEGMENT_CPUS_ON_CPU_CLUSTER)
