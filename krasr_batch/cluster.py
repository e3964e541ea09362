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


# ---------------------------------------------------------------- placement over node shapes

UNIT = 10_000  # Ray counts resources in units of 1/10000
MAX_CPU_ACTORS = 32
REPARTITION_CPUS = 0.05  # the two repartitions only re-slice blocks (Ray Data's default would be a whole CPU)
SEGMENT_CPUS_ON_CPU_CLUSTER = 0.5  # decode + VAD is a small fraction of CPU decoding work
SEGMENT_CPUS_ON_GPU_CLUSTER = 1.0  # next to a GPU, decoding audio is what keeps the model fed
MIN_SEGMENT_CPUS = 0.05
MIN_ACTOR_CPUS = 0.01  # a Ray CPU share is a scheduling token; the actor's threads are set apart


def _units(x: float) -> int:
    return int(round(float(x) * UNIT))


@dataclass(frozen=True)
class Placement:
    """What every stage of the run asks Ray for, and how many model actors there are."""

    use_gpu: bool
    actors: int
    ray_args: dict[str, Any]  # num_gpus / num_cpus / resources for the model stage's map_batches
    threads: int | None  # torch threads per CPU actor
    segment_cpus: float = SEGMENT_CPUS_ON_CPU_CLUSTER  # each decode-and-segment task
    repartition_cpus: float = REPARTITION_CPUS  # each task of either repartition
    problem: str | None = None  # why this plan may not fit the nodes it was made for (None: it does)

    def actor_request(self) -> dict[str, float]:
        """One model actor's Ray resources, as Ray lists them (``{"CPU": .., "GPU": .., "memory": .., NAME: ..}``)."""
        req = {"CPU": float(self.ray_args.get("num_cpus", 0))}
        if self.ray_args.get("num_gpus"):
            req["GPU"] = float(self.ray_args["num_gpus"])
        if self.ray_args.get("memory"):
            req["memory"] = float(self.ray_args["memory"])
        req.update(self.ray_args.get("resources", {}))
        return req

    def task_requests(self) -> dict[str, dict[str, float]]:
        """One task of every stage that is not the model actors, by stage."""
        return {"repartition (files)": {"CPU": self.repartition_cpus},
                "decode and segment": {"CPU": self.segment_cpus},
                "repartition (model batches)": {"CPU": self.repartition_cpus}}

    def describe(self) -> str:
        tasks = ", ".join(f"{k} {v['CPU']:g}" for k, v in self.task_requests().items())
        req = {k: (amount(k, v) if k == "memory" else v) for k, v in self.actor_request().items()}
        return f"{self.actors} model actor(s) of {req}; CPUs per task: {tasks}"


def _actor_cap(node: dict[str, float], use_gpu: bool, resource: str | None, memory: float | None = None) -> int | None:
    """How many model actors a node could hold by its GPUs / custom resource / Ray ``memory`` when each actor
    asks for ``memory`` bytes (None: no such limit)."""
    cap = None
    if use_gpu:
        cap = int(node.get("GPU", 0) + 1e-9)
    if resource:
        r = int(node.get(resource, 0) + 1e-9)
        cap = r if cap is None else min(cap, r)
    if memory and "memory" in node:
        m = int(node["memory"] // memory)
        cap = m if cap is None else min(cap, m)
    return cap


def _max_actors(cpu_u: int, cap: int | None, a_u: int, n: int) -> int:
    most = n if cap is None else min(cap, n)
    return min(most, cpu_u // a_u) if a_u > 0 else most


def fits(nodes: list[dict[str, float]], place: Placement) -> bool:
    """True if, however Ray spreads the model actors over ``nodes``, every actor and one task of each other
    stage can run at the same time (the condition ``plan_placement`` plans for). See ``_feasible``."""
    res, mem = _resource_of(place), place.ray_args.get("memory")
    return _feasible(nodes, _units(place.actor_request()["CPU"]), _task_units(place), place.use_gpu, res,
                     place.actors, _capacity_target(nodes, place.use_gpu, res, place.actors, mem), mem)


def _resource_of(place: Placement) -> str | None:
    return next(iter(place.ray_args.get("resources") or {}), None)


def _task_units(place: Placement) -> int:
    return sum(_units(r["CPU"]) for r in place.task_requests().values())


def _capacity_target(nodes: list[dict[str, float]], use_gpu: bool, resource: str | None, n: int,
                     memory: float | None = None) -> int:
    """Actors the nodes seen now must hold: all of them, or as many as their GPUs / resource units / memory
    allow (an autoscaler adds nodes for the others)."""
    caps = [_actor_cap(nd, use_gpu, resource, memory) for nd in nodes]
    if any(c is None for c in caps):
        return n
    return min(n, sum(caps))  # type: ignore[arg-type]


def _feasible(nodes, a_u: int, t_u: int, use_gpu: bool, resource: str | None, n: int, target: int,
              memory: float | None = None) -> bool:
    """Integer (Ray unit) check of a plan: actors of ``a_u`` CPU, ``t_u`` CPU for one task of each stage.

    - the nodes can hold ``target`` actors at once;
    - no spread of the ``n`` actors leaves every node with less than ``t_u`` CPU free. Ray places actors
      where it likes and they never move, so this is checked against the worst spread: to take node ``i``
      below ``t_u`` free takes ``need_i`` actors on it; that fails where the node cannot hold ``need_i``
      (then it always keeps room), and in all if the ``need_i`` add up to more than ``n``.
    """
    held, need_all, always_room = 0, 0, False
    for nd in nodes:
        cpu_u = _units(nd.get("CPU", 0))
        most = _max_actors(cpu_u, _actor_cap(nd, use_gpu, resource, memory), a_u, n)
        held += most
        if cpu_u < t_u:
            continue  # never room for the tasks, whatever runs there
        need = (cpu_u - t_u) // a_u + 1 if a_u > 0 else n + 1
        if need > most:
            always_room = True
        need_all += need
    return held >= target and (always_room or need_all > n)


def _best_share(nodes, a_pref: float, t_u: int, use_gpu: bool, resource: str | None, n: int,
                target: int, memory: float | None = None) -> int | None:
    """The largest actor CPU share (units, at most ``a_pref``) for which ``_feasible`` holds, or None.

    ``_feasible`` only changes where a node's actor count (``CPU / m``) or the count that takes it below
    the tasks' room (``(CPU - tasks) / m``) steps, so the best share is ``a_pref`` or at one of those steps.
    """
    lo, hi = _units(MIN_ACTOR_CPUS), _units(a_pref)
    cands = {hi}
    for nd in nodes:
        cpu_u = _units(nd.get("CPU", 0))
        cap = _actor_cap(nd, use_gpu, resource, memory)
        top = min(n if cap is None else min(cap, n), cpu_u // lo) + 1
        for m in range(1, top + 1):
            for b in ((cpu_u - t_u) // m, cpu_u // m):
                cands.update((b, b - 1))
    for a_u in sorted((c for c in cands if lo <= c <= hi), reverse=True):
        if _feasible(nodes, a_u, t_u, use_gpu, resource, n, target, memory):
            return a_u
    return None


def memory_bound_actors(nodes: list[dict[str, float]], replica_bytes: int | None) -> int | None:
    """How many CPU replicas of ``replica_bytes`` the nodes' ``memory`` resources hold, at most one per CPU of
    each node (None: no size given, or no node reports its memory)."""
    if not replica_bytes or not any("memory" in nd for nd in nodes):
        return None
    return sum(min(int(nd["CPU"]), int(nd["memory"] // replica_bytes)) if "memory" in nd else int(nd["CPU"])
               for nd in nodes if nd.get("CPU", 0) >= 1)


def plan_placement(nodes: list[dict[str, float]], device: str, actors: int, actor_resource: str | None,
                   work_bound: int | None = None, replica_bytes: int | None = None) -> Placement:
    """What each stage asks Ray for, from the shapes of the cluster's alive nodes (``ray.nodes()`` resources).

    Pure: the same node shapes always give the same plan. The plan holds whatever node each actor lands on:
    every node keeps room for one task of each other stage (manifest read, both repartitions,
    decode-and-segment) with as many actors on it as it could hold, so the model actors, which hold their
    resources for the whole run, can never starve the stages that feed them (see ``fits``).

    - GPUs present (or ``device="cuda"``, e.g. an autoscaling GPU group still at zero): one actor per GPU,
      each with ``num_gpus=1`` and up to 1 CPU, so actors only land on GPU nodes; ``actors`` (>0) overrides
      the count.
    - no GPUs: CPU actors; by default one single-threaded replica per CPU of each node (up to 32), which
      measured 2.7x the throughput of one replica with two threads on a 2-core machine (beam search's small
      matrices do not scale over threads; see BENCHMARKS.md). Their Ray CPUs are fractional: each node keeps
      one task of every other stage free, and nodes above 8 CPUs an eighth of their CPUs for decoding audio.
    - ``actor_resource``: each actor also needs one unit of that custom Ray resource, so actors land only on
      nodes started with it (``ray start --resources='{"asr": 1}'``); by default one actor per unit.
    - ``work_bound``: at most this many model blocks are to be decoded (None: not known). CPU actors chosen by
      default are then no more than that, and as wide as ``actors`` would make them: a replica that could get
      no block costs seconds of CPU to start and nothing else (a small job; ``orchestrate.model_blocks_bound``).
    - ``replica_bytes``: a CPU replica's peak memory (``engines.base.replica_memory_bytes``). CPU actors chosen
      by default are then no more than each node's ``memory`` resource holds (Ray's memory for tasks and
      actors, beside its object store), and as wide as ``actors`` would make them: one replica per core of
      the KRASR model takes about 3.5 GiB each, more than many machines have per core. Each such replica also
      asks Ray for ``replica_bytes`` of ``memory``, so that Ray, which places actors by their CPU share,
      puts no more on a node than its memory holds (on nodes of unequal memory it would otherwise crowd a
      node of many cores and little memory); the plan's shares are made to fit with that cap.
    """
    nodes = [dict(nd) for nd in nodes]
    use_gpu = device == "cuda" or (sum(int(nd.get("GPU", 0)) for nd in nodes) > 0 and device != "cpu")
    res = actor_resource
    # default CPU replicas ask Ray for their memory, so that no node gets more than it holds (Ray places them
    # by CPU share otherwise: on nodes of unequal memory, a node of many cores and little memory takes too
    # many); only where some node holds one, or none could ever be placed
    mem = float(replica_bytes) if (not use_gpu and not res and not actors and replica_bytes
                                   and any(nd.get("memory", 0) >= replica_bytes for nd in nodes)) else None
    caps = [_actor_cap(nd, use_gpu, res, mem) for nd in nodes]
    hosts = [(nd, c) for nd, c in zip(nodes, caps) if c is None or c >= 1]
    fixed = 2 * REPARTITION_CPUS  # the manifest is read by the driver (pipeline.orchestrate._read_manifest): no task

    def reserve(cpu: float, seg: float) -> float:
        return max(fixed + seg, cpu / 8 if cpu > 8 else 0.0)

    if use_gpu or res:
        n = actors or max(1, sum(c for _, c in hosts if c is not None))
        a_pref = 1.0 if use_gpu else min(
            [(nd.get("CPU", 0) - reserve(nd.get("CPU", 0), SEGMENT_CPUS_ON_CPU_CLUSTER)) / min(c, n)
             for nd, c in hosts if c] or [1.0])
    else:
        per_node = [int(nd.get("CPU", 0)) for nd in nodes if nd.get("CPU", 0) >= 1]
        n = actors or max(1, min(sum(per_node), MAX_CPU_ACTORS))
        if not actors:  # fewer than one per CPU: what memory holds, the blocks a small job has
            fewer = [b for b in (memory_bound_actors(nodes, replica_bytes), work_bound) if b is not None and b < n]
            if fewer:
                actors = n = max(min(fewer), 1)
        shares = [(nd.get("CPU", 0) - reserve(nd.get("CPU", 0), SEGMENT_CPUS_ON_CPU_CLUSTER)) / int(nd["CPU"])
                  for nd in nodes if nd.get("CPU", 0) >= 1]
        if actors:  # fewer, wider replicas: as wide as the largest node allows
            shares = [max(nd.get("CPU", 0) - reserve(nd.get("CPU", 0), SEGMENT_CPUS_ON_CPU_CLUSTER)
                          for nd in nodes)]
        a_pref = min(shares) if shares else 1.0
    a_pref = max(a_pref, MIN_ACTOR_CPUS)
    target = _capacity_target(nodes, use_gpu, res, n, mem)

    seg = SEGMENT_CPUS_ON_GPU_CLUSTER if use_gpu else SEGMENT_CPUS_ON_CPU_CLUSTER
    share_u, problem = None, None
    while share_u is None and seg >= MIN_SEGMENT_CPUS - 1e-9:
        share_u = _best_share(nodes, a_pref, _units(fixed + seg), use_gpu, res, n, target, mem)
        if share_u is None:
            seg = round(seg / 2, 4)
    if share_u is None:
        seg = MIN_SEGMENT_CPUS
        share_u = _units(a_pref)
        problem = (f"no actor size lets {n} model actor(s) and one task of each other stage run at once on "
                   "these nodes")
    if not hosts:
        need = "a GPU" if use_gpu else ""
        if res:
            need = f"{need} and the resource {res!r}" if need else f"the resource {res!r}"
        problem = f"no node has {need} yet: the model actors wait for a node that has it"
    share = share_u / UNIT
    extra = {"resources": {res: 1}} if res else {}
    if use_gpu:
        return Placement(True, n, {"num_gpus": 1, "num_cpus": share, **extra}, None, seg, problem=problem)
    if mem:
        extra["memory"] = int(mem)
    return Placement(False, n, {"num_cpus": share, **extra}, max(1, round(share)), seg, problem=problem)


# ---------------------------------------------------------------- token authentication

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_LOOKUP = ("$RAY_AUTH_TOKEN, else the file named by $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token "
                "(`ray get-auth-token` on the head node prints the cluster's token)")


class ClusterAuthError(RuntimeError):
    """The cluster wants a token this process does not have, or refused the one it sent."""


def default_token_path() -> str:
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def token_source() -> str | None:
    """Where Ray will read this process's token from, in Ray's own order; None when there is none."""
    if os.environ.get(TOKEN_ENV):
        return f"${TOKEN_ENV}"
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        return f"${TOKEN_PATH_ENV} ({path})"
    if os.path.isfile(default_token_path()):
        return default_token_path().replace(os.path.expanduser("~"), "~", 1)
    return None


def use_cluster_token() -> None:
    """Send a token to the cluster whenever this process has one, as Ray itself does for ``address="auto"``.

    Ray's clients send a token only with ``RAY_AUTH_MODE=token`` in their environment; for an explicit
    address (``--address HOST:6379``, the Jobs API's ``http://HOST:8265``) they otherwise connect without
    one and a cluster with token authentication turns them away. An explicit ``RAY_AUTH_MODE`` is kept.
    """
    if os.environ.get(AUTH_MODE_ENV) is not None or token_source() is None:
        return
    os.environ[AUTH_MODE_ENV] = "token"
    import sys

    if "ray._raylet" in sys.modules:  # Ray's config was read already: read it again with token mode on
        from ray._raylet import Config

        Config.initialize("")


def unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at ``address`` (``host:port`` or ``ray://host:port``), or None when something does or
    the address names no port (``auto``: Ray looks it up). Ray itself retries a dead address for minutes with
    its messages held back, which looks like a hang."""
    import socket

    scheme, sep, rest = address.strip().partition("://")
    if not sep:
        scheme, rest = "", scheme
    if scheme not in ("", "ray"):
        return None
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        return os.strerror(e.errno) if e.errno else (str(e) or type(e).__name__)


def auth_refused(address: str | None, detail: str = "") -> ClusterAuthError:
    """The one-line error for a cluster that refused this process's token (or got none)."""
    src = token_source()
    sent = f"the token from {src}" if src else "no token (none was found)"
    where = f" at {address}" if address else ""
    return ClusterAuthError(f"the Ray cluster{where} refused the authentication token: krasr-batch sent {sent}. "
                            f"The token is looked up in {TOKEN_LOOKUP}" + (f" [{detail}]" if detail else ""))


_AUTH_MARKERS = ("InvalidAuthToken", "Unauthenticated", "authentication token", "Authentication required",
                 "Authentication failed")


def is_auth_failure(exc: BaseException, output: str = "") -> bool:
    """True for a failure to connect that the cluster's token authentication caused."""
    if type(exc).__name__ == "AuthenticationError":
        return True
    text = f"{exc}\n{output}"
    return any(m in text for m in _AUTH_MARKERS)


# ---------------------------------------------------------------- what Ray cannot place

@dataclass(frozen=True)
class Demand:
    """Requests of one shape that Ray holds pending: ``count`` of ``bundle``."""

    bundle: dict[str, float]
    count: int

    def describe(self) -> str:
        shape = ", ".join(f"{k}: {amount(k, v)}" for k, v in sorted(self.bundle.items()))
        return f"{{{shape}}} x{self.count}"


def amount(resource: str, value: float) -> str:
    """A Ray resource's quantity as a person reads it: bytes of memory in GiB, the rest as numbers."""
    return f"{value / 2**30:.2f} GiB" if "memory" in resource else f"{value:g}"


def unplaceable(demands: list[Demand], free: list[dict[str, float]]) -> list[Demand]:
    """The pending demands that no node has the free resources for right now (pure)."""

    def fits_on(bundle: dict[str, float], node: dict[str, float]) -> bool:
        return all(_units(node.get(k, 0)) >= _units(v) for k, v in bundle.items() if v > 0)

    return [d for d in demands if not any(fits_on(d.bundle, nd) for nd in free)]


@dataclass(frozen=True)
class ClusterDemand:
    pending: list[Demand]  # what Ray is waiting to place
    free: list[dict[str, float]]  # free resources of each alive node
    launching: bool  # an autoscaler is starting nodes


def read_cluster_demand() -> ClusterDemand | None:
    """Pending resource demands and each node's free resources, as ``ray status`` shows them (GCS).

    None when this Ray cannot say (no connection, an older API): the caller then assumes nothing is stuck.
    """
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
        pending = [Demand(dict(b.bundle), int(b.count))
                   for group in (status.resource_demands.ray_task_actor_demand
                                 + status.resource_demands.placement_group_demand)
                   for b in group.bundles_by_count]
        free = [{u.resource_name: u.total - u.used for u in node.resource_usage.usage}
                for node in status.active_nodes + status.idle_nodes]
        return ClusterDemand(pending, free, bool(status.pending_launches or status.pending_nodes))
    except Exception as e:  # noqa: BLE001 - diagnostics only: never stop a run over them
        log.debug("cannot read the cluster's resource demands: %s", e)
        return None


def placement_advice(stuck: list[Demand], actor_resource: str | None) -> str:
    """What to change so that these demands can be placed."""
    keys = {k for d in stuck for k in d.bundle}
    tips = []
    if "GPU" in keys:
        tips.append("add GPU nodes (or let the autoscaler start them), or run with --device cpu")
    custom = sorted(k for k in keys if k not in ("CPU", "GPU", "memory", "object_store_memory")
                    and not k.startswith("node:"))
    for k in custom:
        tips.append(f"start nodes with the resource (ray start --resources='{{\"{k}\": 1}}')"
                    + (" or drop --actor-resource" if k == actor_resource else ""))
    if "CPU" in keys:
        tips.append("give the cluster nodes with more free CPUs, or fewer --actors (the model actors hold "
                    "their CPUs for the whole run)")
    if "memory" in keys:
        tips.append("give the cluster nodes with more free memory (each CPU model actor asks Ray for its "
                    "estimated peak), or set --actors (actors of a given count ask for no memory)")
    return "; ".join(tips) or "check `ray status` for what holds the cluster's resources"
