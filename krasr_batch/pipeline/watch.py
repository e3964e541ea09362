"""The driver waiting on Ray: the batches pulled on a thread of their own (:class:`Feed`) so the driver
keeps its progress line alive, and :class:`StallWatch`, which tells a slow run from one that can never go on.
"""

from __future__ import annotations

import logging
import time

from krasr_batch.pipeline.errors import RunStalled


class Feed:
    """The dataset's batches, pulled on a thread of their own; iterating yields a batch, or None each
    ``tick_s`` that none came, so the driver keeps its progress line and stall check alive while Ray waits."""

    def __init__(self, ds, tick_s: float = 1.0):
        import queue
        import threading

        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.tick_s = tick_s
        self.stopped = threading.Event()
        self._threads_before = set(threading.enumerate())  # Ray Data's executors started after this are ours
        self.thread = threading.Thread(target=self._pull, args=(ds,), name="krasr-feed", daemon=True)
        self.thread.start()

    def _pull(self, ds) -> None:
        try:
            for b in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                if not self._put(("batch", b)):
                    return
            self._put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which raises it
            self._put(("error", e))

    def _put(self, item) -> bool:
        import queue

        while not self.stopped.is_set():
            try:
                self.q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        import queue

        while True:
            try:
                kind, value = self.q.get(timeout=self.tick_s)
            except queue.Empty:
                yield None
                continue
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value

    def stop(self) -> None:
        self.stopped.set()

    def abandon(self, wait_s: float) -> None:
        """The run stops early (too many failures, a stall, an interrupt): the thread is told to stop and
        given ``wait_s`` to end, closing Ray Data's iterator and executor, before the caller shuts Ray down.
        Ray ends the whole process, with status 1 and none of krasr-batch's lines, when a thread calls into
        it after its shutdown ("The core worker has already been shutdown ... The process will exit"): a
        run aborted while batches still came lost its message that way.

        A thread still waiting inside the iterator (on actors that cannot be placed: a stalled run) cannot be
        told anything, so the executors this feed started are shut down first (:func:`_close_executors`):
        their output ends and the thread leaves the iterator. Left running, Ray's shutdown freed what they
        were still using, and a stalled run ended in a segmentation fault (-11) instead of its message."""
        self.stop()
        self.thread.join(min(wait_s, 1.0))  # a thread between batches ends at once, closing them itself
        if self.thread.is_alive():
            _close_executors(self._threads_before)
            self.thread.join(max(wait_s, 5.0))
        for name in ("ray.data", "ray._private.services"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _close_executors(before: set) -> None:
    """Shut down Ray Data's streaming executors that are not in ``before`` (the threads alive when a
    :class:`Feed` started): each is a thread of its own. Nothing is done where this Ray Data's executor is
    not where 2.60 has it (the thread is then left to Ray's shutdown, as before)."""
    import threading

    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return
    for ex in [t for t in threading.enumerate() if isinstance(t, StreamingExecutor) and t not in before]:
        try:
            ex.shutdown(force=True)
        except Exception:  # noqa: BLE001 - best effort: the run is stopping anyway, with its own message
            logging.getLogger(__name__).debug("closing Ray Data's executor failed", exc_info=True)


class StallWatch:
    """Tells a slow run from one that can never go on.

    Once nothing has come back for a while, it asks Ray (as ``ray status`` does) for pending requests that
    no alive node has the free resources for. Past ``warn_s`` of both, the progress line names them; past
    ``timeout_s`` (``--stall-timeout``, 0: never), the run stops with what to change. While an autoscaler
    is starting nodes, waiting is expected and nothing is reported.
    """

    WARN_S = 120.0
    POLL_S = 5.0

    def __init__(self, timeout_s: float, actor_resource: str | None, read=None):
        self.timeout_s = timeout_s
        self.warn_s = min(self.WARN_S, timeout_s / 2) if timeout_s > 0 else self.WARN_S
        self.actor_resource = actor_resource
        self.read = read
        self.last_progress = time.perf_counter()
        self.blocked_since: float | None = None
        self.stuck: list = []
        self.free: list[dict[str, float]] = []
        self.last_poll = 0.0

    def progress(self, now: float) -> None:
        self.last_progress = now
        self.blocked_since, self.stuck = None, []

    def _poll(self, now: float) -> None:
        from krasr_batch.cluster import read_cluster_demand, unplaceable

        self.last_poll = now
        state = (self.read or read_cluster_demand)()
        stuck = [] if state is None or state.launching else unplaceable(state.pending, state.free)
        if stuck:
            self.blocked_since = self.blocked_since or now
            self.stuck, self.free = stuck, state.free
        else:
            self.blocked_since, self.stuck = None, []

    def check(self, now: float) -> str | None:
        """The progress line's notice, if any; raises RunStalled past the timeout."""
        quiet = now - self.last_progress
        if quiet < min(self.POLL_S * 2, self.warn_s):
            return None
        if now - self.last_poll >= self.POLL_S:
            self._poll(now)
        if self.blocked_since is None:
            return None
        what = "; ".join(d.describe() for d in self.stuck)
        if self.timeout_s > 0 and quiet >= self.timeout_s and now - self.blocked_since >= self.POLL_S:
            from krasr_batch.cluster import amount, placement_advice

            asked = {k for d in self.stuck for k in d.bundle}  # memory is listed when a stuck request asks for it
            free = "; ".join(", ".join(f"{k} {amount(k, v)}" for k, v in sorted(nd.items())
                                       if k in ("CPU", "GPU") or k in asked
                                       or not (k.startswith("node:") or "memory" in k))
                             or "nothing" for nd in self.free)
            raise RunStalled(
                f"nothing came back for {_hms(quiet)} and Ray cannot place {what} on any node (free per node: "
                f"{free or 'no node'}). To change: {placement_advice(self.stuck, self.actor_resource)}. "
                f"--stall-timeout {self.timeout_s:g} stopped the run (0 waits forever). Finished files are kept; "
                "rerun the same command to continue.")
        if quiet >= self.warn_s:
            return f"STALLED {_hms(quiet)}: no node has room for {what}"
        return None


def _hms(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))

