"""One data-parallel replica's runner thread under batching="step" (the async engine's other loop).

The replica's StepBatcher (diffserve.engine.step_batching) takes its requests from the engine's shared
queue, under the engine's lock, at each step boundary: requests with the running step key join the
running batch while its caps allow, and each caller is answered as soon as its request finishes. A
busy replica takes no queued request while another replica idles (that one takes it at once), so
requests still go to the least-loaded replica. The request path's guarantees hold per request:

- a caller that goes away, or whose run deadline passes (the watchdog marks it), is dropped from the
  batch at the next step boundary and its state freed; the others keep stepping;
- progress callbacks report each request's own step i of n;
- a failed step fails the requests of that call only; a worker group that died fails (or, with several
  replicas, requeues once) its running and parked requests, and the replica restarts as in request mode;
- drain lets running and parked requests finish; the watchdog stops them at the grace deadline.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from diffserve.engine.step_batching import StepBatcher

if TYPE_CHECKING:
    from diffserve.engine.async_engine import AsyncDiffusionEngine, Replica
    from diffserve.engine.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)


class ReplicaStepBatcher(StepBatcher):
    """A replica's StepBatcher over the engine's shared queue, reporting to the engine."""

    def __init__(self, engine: "AsyncDiffusionEngine", replica: "Replica"):
        super().__init__(replica.engine, queue=engine.scheduler, lock=engine._cond, may_take=self._may_take)
        self.server, self.replica = engine, replica

    def _may_take(self) -> bool:
        """An idle replica takes the queue's next request; a busy one leaves it to an idle one."""
        if not self.busy:
            return True
        return not any(r is not self.replica and r.idle_since is not None and r.status != "failed"
                       for r in self.server.replicas)

    def started(self, entry: "ScheduledRequest") -> None:
        entry.handle.started_at = time.monotonic()

    def progressed(self, entry: "ScheduledRequest", done: int, total: int) -> None:
        self.replica.last_progress = time.monotonic()
        if entry.handle.progress is not None and not entry.cancelled:
            entry.handle.progress(done, total)

    def stepped(self, samples: int, seconds: float) -> None:
        self.replica.completed_steps += 1
        self.replica.preemptions = self.preemptions
        if self.server.on_step is not None:
            self.server.on_step(self.replica.index, samples, seconds)


def run_steps(engine: "AsyncDiffusionEngine", replica: "Replica") -> None:
    """The replica's runner loop: step while it has requests, wait for work when it has none."""
    batcher = ReplicaStepBatcher(engine, replica)
    while _wait_for_work(engine, replica, batcher):
        try:
            answered = batcher.advance()
        except Exception as exc:  # e.g. the worker group died between steps: never let the runner die
            logger.exception("replica %d failed at a step boundary", replica.index)
            answered = batcher.fail_all(exc)
        if not replica.engine.is_healthy():  # parked requests' states died with the workers
            answered += batcher.fail_all(RuntimeError("the replica's worker group failed"))
        _publish(engine, replica, batcher)
        answered = engine._answer(replica, answered)
        if engine.on_outputs is not None and answered:
            engine.on_outputs([out for _, out in answered])
        if not replica.engine.is_healthy() and engine._running:
            engine._recover(replica)
            if not engine._running:  # shut down while it restarted: the new workers are this thread's
                replica.engine.shutdown()
    engine._answer(replica, batcher.stop_all())
    _publish(engine, replica, batcher)


def _wait_for_work(engine: "AsyncDiffusionEngine", replica: "Replica", batcher: StepBatcher) -> bool:
    """Until the replica has requests to step, or it is first in line for a queued one; False when the
    engine stops or the replica failed."""
    with engine._cond:
        if not batcher.busy:
            replica.idle_since = time.monotonic()
        while engine._running and replica.status != "failed" and not batcher.busy and not (
                len(engine.scheduler) and engine._first_in_line(replica)):
            engine._cond.wait()
        if replica.idle_since is not None:
            replica.idle_since = None
            engine._cond.notify_all()  # what is left in the queue is the next idle replica's to take
        serving = engine._running and replica.status != "failed"
        if serving and replica.status == "ready":
            replica.status = "busy"
        return serving


def _publish(engine: "AsyncDiffusionEngine", replica: "Replica", batcher: StepBatcher) -> None:
    """What the watchdog, cancellation and /metrics read: the replica's requests and state."""
    with engine._cond:
        replica.running = [run.entry for run in batcher._runs()]
        if replica.status in ("ready", "busy"):
            # A dead group takes no more work; _recover decides what happens to it.
            healthy = replica.engine.is_healthy()
            replica.status = "recovering" if not healthy else "busy" if batcher.busy else "ready"
