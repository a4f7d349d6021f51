"""The serving front of the engine: one scheduler (diffserve.engine.scheduler) feeding one runner
thread per data-parallel replica, with the engine's health, per-replica recovery and shutdown.

Callers (the HTTP server) `await generate(request)`: the request is admitted against the model's spec
at once (InvalidRequestError: a 400; over the work budget: a 400 naming the limit), refused when the
queue is full (QueueFullError: 429) or no replica can take work (EngineUnavailable: 503), and queued.
A replica's runner thread, whenever its replica is free, starts a batch with the oldest request, waits
up to `batch_wait_ms` for compatible ones, runs it, and resolves each caller's future. So each batch
goes to the least-loaded replica: one that runs nothing, and of several such the one idle longest
(light traffic alternates over the replicas). A busy replica takes nothing: requests wait in the one
shared queue, where they can still join a batch, never behind another replica's batch. One replica
(the default) is the same mechanism with one runner. `run_all` is the offline form (Omni with data
parallelism): it queues a list of requests and blocks for their outputs. With batching="step" each
runner drives a StepBatcher instead (diffserve.engine.step_runner): queued requests join its running
batch at the next step boundary, and each caller is answered as soon as its own request is decoded.

Nothing accepted is lost or left hanging:
- a caller that goes away leaves the queue at once; if it was running and every caller of its batch
  is gone, the batch stops at its next step (or block);
- a request carries its own deadlines: time in the queue and time running, each ending it with a
  timeout error (the watchdog thread enforces them, and aborts the running batch when needed);
- a failed worker group (a rank died, raised, or made no progress for `step_timeout_s`) fails the
  batch it was running, then restarts with its weights reloaded while the other replicas keep
  serving; with several replicas the failed batch's requests go back to the head of the queue once
  (another replica runs them), so a replica that dies loses none of them. New work gets 503 only
  while no replica is healthy;
- `drain(grace_s)` (SIGTERM) stops admission, answers everything queued with 503, lets the running
  batches finish within the grace period and stops them after.

States (`status`, of the engine): starting -> ready <-> busy; recovering after a failure; draining;
failed when no replica can serve (a hung in-process worker, restarts that fail) or a replica failed to
load. Each replica has its own state (starting, ready, busy, recovering, failed); the engine is ready
while any replica is ready, busy while every healthy one is busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from typing import Callable, Sequence

from diffserve.engine.engine import DiffusionEngine, format_duration
from diffserve.engine.errors import EngineUnavailable
from diffserve.engine.scheduler import Batch, QueueFullError, ScheduledRequest
from diffserve.engine.step_runner import run_steps
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
EngineSource = DiffusionEngine | Callable[[], DiffusionEngine]

__all__ = ["AsyncDiffusionEngine", "EngineUnavailable", "QueueFullError", "Replica", "WorkBudgetError"]

RETRY_AFTER_RECOVERY_S = 30.0
RETRY_AFTER_LOADING_S = 5.0
REPLICA_STATES = ("starting", "ready", "busy", "recovering", "failed")


class WorkBudgetError(ValueError):
    """A request whose estimated work exceeds what this server accepts."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class _Caller:
    """What a runner thread needs to answer one waiting caller: an asyncio future on the caller's
    loop, or (loop None: a blocking offline caller) a concurrent.futures future."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None, progress: ProgressCallback | None,
                 queue_timeout_s: float | None, run_timeout_s: float | None):
        self.loop = loop
        self.future = loop.create_future() if loop is not None else concurrent.futures.Future()
        self.progress = progress
        self.queue_timeout_s = queue_timeout_s
        self.run_timeout_s = run_timeout_s
        self.started_at: float | None = None
        self.stop_reason: DiffusionOutput | None = None  # set when the watchdog ends it


class Submission:
    """An admitted, queued request; `await wait()` for its output. Cancelling the wait (the client
    left, the job was deleted) takes it out of the queue, or stops its batch if nobody else waits."""

    def __init__(self, engine: "AsyncDiffusionEngine", entry: ScheduledRequest):
        self.engine, self.entry = engine, entry

    @property
    def request(self) -> OmniDiffusionRequest:
        return self.entry.req

    async def wait(self) -> DiffusionOutput:
        try:
            return await self.entry.handle.future
        except asyncio.CancelledError:
            self.engine._cancel(self.entry)
            raise


class Replica:
    """One worker group (a DiffusionEngine on its own devices) and the runner thread feeding it.
    Its fields change under the engine's condition variable."""

    def __init__(self, index: int, source: EngineSource):
        self.index = index
        self.source: EngineSource | None = source
        self.engine: DiffusionEngine | None = None
        self.status = "starting"
        self.running: list[ScheduledRequest] = []
        self.last_progress = time.monotonic()
        self.restart_times: list[float] = []
        self.restarts = 0
        self.completed_steps = 0
        self.preemptions = 0  # batching="step": step boundaries where its running requests were parked
        # When it last became free to take a batch; None while it runs one (or is not waiting).
        self.idle_since: float | None = None
        self.thread: threading.Thread | None = None

    @property
    def healthy(self) -> bool:
        return self.status in ("ready", "busy")


class AsyncDiffusionEngine:
    """`engine`: a DiffusionEngine, a function that builds one, or a list of them (one per
    data-parallel replica). A function runs in its replica's runner thread (status "starting"
    meanwhile): worker processes die with the thread that started them, so they must be started by a
    thread that lives as long as the engine."""

    def __init__(
        self,
        engine: EngineSource | Sequence[EngineSource],
        max_queue: int | None = 256,
        batch_wait_ms: float = 5.0,
        on_batch: Callable[[list[OmniDiffusionRequest], list[DiffusionOutput], float], None] | None = None,
        step_timeout_s: float | None = 600.0,
        max_restarts: int = 3,
        restart_window_s: float = 600.0,
        warmup: Callable[[DiffusionEngine], None] | None = None,
    ):
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (or None: unbounded), got {max_queue}")
        sources = list(engine) if isinstance(engine, (list, tuple)) else [engine]
        if not sources:
            raise ValueError("AsyncDiffusionEngine needs at least one engine (replica)")
        # The engine that answers admission questions (spec, work estimates): the first replica to
        # load. Every replica runs the same model with the same config, so any would answer alike.
        self.engine: DiffusionEngine | None = None
        self.scheduler = None
        self.max_queue = max_queue
        self.load_error: str | None = None
        self.load_exception: BaseException | None = None
        self.on_load_failure: Callable[[], None] | None = None
        self.batch_wait_s = batch_wait_ms / 1000
        # Run once a replica has loaded, before it takes work (e.g. compile for the shapes a server
        # expects, so no request pays a compile stall).
        self.warmup = warmup
        self.on_batch = on_batch
        # Under batching="step", for /metrics: the outputs answered at a step boundary, and every step
        # run: on_step(replica index, samples, seconds).
        self.on_outputs: Callable[[list[DiffusionOutput]], None] | None = None
        self.on_step: Callable[[int, int, float], None] | None = None
        self.step_timeout_s = step_timeout_s
        # More than max_restarts of one replica within restart_window_s: that replica is broken for
        # good ("failed").
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.replicas = [Replica(i, source) for i, source in enumerate(sources)]
        # With several replicas a request whose replica died runs again on another (once).
        self._requeue_on_replica_failure = len(self.replicas) > 1
        self._cond = threading.Condition()
        self._running = True
        self._draining = False
        self._drain_deadline: float | None = None
        self._loaded = threading.Event()  # the first replica loaded (or a load failed)
        self._all_loaded = threading.Event()  # every replica finished loading, well or not
        self._loads_pending = len(self.replicas)
        for replica in self.replicas:
            replica.thread = threading.Thread(target=self._serve, args=(replica,), daemon=True,
                                              name=f"diffserve-replica-{replica.index}")
            replica.thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="diffserve-watchdog", daemon=True)
        self._watchdog.start()
        if all(isinstance(source, DiffusionEngine) for source in sources):
            self._all_loaded.wait()

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    @property
    def spec(self):
        return self._ready_engine().spec

    def _ready_engine(self) -> DiffusionEngine:
        if self.engine is None:
            if self.load_error:
                raise EngineUnavailable(f"the model failed to load: {self.load_error}")
            raise EngineUnavailable("the model is still loading", retry_after_s=RETRY_AFTER_LOADING_S)
        return self.engine

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """Until the first replica can serve (or a load failed)."""
        return self._loaded.wait(timeout)

    def wait_until_all_loaded(self, timeout: float | None = None) -> bool:
        """Until every replica has loaded (or failed to)."""
        return self._all_loaded.wait(timeout)

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self._draining:
            return "draining"
        states = {replica.status for replica in self.replicas}
        for state in ("ready", "busy", "recovering", "starting"):
            if state in states:
                return state
        return "failed"

    def replica_summary(self) -> dict:
        """How many replicas can take work, of how many, and each one's state (for /health)."""
        states = [replica.status for replica in self.replicas]
        return {"healthy": sum(s in ("ready", "busy") for s in states), "total": len(states), "states": states}

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler) if self.scheduler is not None else 0

    @property
    def running_requests(self) -> int:
        return sum(len(replica.running) for replica in self.replicas)

    @property
    def completed_steps(self) -> int:
        return sum(replica.completed_steps for replica in self.replicas)

    def is_healthy(self) -> bool:
        return self.status in ("ready", "busy") and any(
            replica.healthy and replica.thread.is_alive() for replica in self.replicas
        )

    # -- admission --------------------------------------------------------------------------------

    def admit(self, req: OmniDiffusionRequest, max_seconds: float | None = None) -> OmniDiffusionRequest:
        """`req` resolved against the model's spec and, with `max_seconds`, within that work budget."""
        self._ready_engine()
        admitted = self.scheduler.admit(req)
        if max_seconds is not None:
            estimate = self.engine.estimate_seconds(admitted)
            if estimate > max_seconds:
                knobs = [k for k in ("num_frames", "height", "num_inference_steps") if k in self.spec.params]
                raise WorkBudgetError(
                    f"this request ({self.engine.describe(admitted)}) is estimated at {format_duration(estimate)} "
                    f"of denoising on this server, over its limit of {format_duration(max_seconds)}; make it "
                    f"smaller ({', '.join(knobs) or 'fewer outputs'})",
                    knobs[0] if knobs else "n",
                )
        return admitted

    def _refuse_if_unavailable(self) -> None:
        """EngineUnavailable unless some replica can take work (called under the condition)."""
        self._ready_engine()
        if not self._running or self._draining:
            raise EngineUnavailable("the server is shutting down")
        if self.load_error is not None:
            raise EngineUnavailable(f"the model failed to load: {self.load_error}")
        states = {replica.status for replica in self.replicas}
        if states & {"ready", "busy"}:
            return
        if "recovering" in states:
            raise EngineUnavailable("the engine is restarting its workers after a failure; retry shortly",
                                    retry_after_s=RETRY_AFTER_RECOVERY_S)
        if "starting" in states:
            raise EngineUnavailable("the model is still loading", retry_after_s=RETRY_AFTER_LOADING_S)
        raise EngineUnavailable("the engine failed and could not recover; the server needs a restart")

    def submit(
        self,
        req: OmniDiffusionRequest,
        progress: ProgressCallback | None = None,
        *,
        max_seconds: float | None = None,
        queue_timeout_s: float | None = None,
        run_timeout_s: float | None = None,
    ) -> "Submission":
        """Admit and queue `req` now (from the event loop); its output arrives through `wait()`.
        Raises InvalidRequestError, WorkBudgetError, QueueFullError or EngineUnavailable, with nothing
        queued. `queue_timeout_s` / `run_timeout_s` bound its time waiting and running; `progress(done,
        total)` runs on a runner thread."""
        admitted = self.admit(req, max_seconds)
        caller = _Caller(asyncio.get_running_loop(), progress, queue_timeout_s, run_timeout_s)
        with self._cond:
            self._refuse_if_unavailable()
            entry = self.scheduler.add(admitted, caller)
            # Every idle runner looks: one woken runner may be busy filling its own batch.
            self._cond.notify_all()
        return Submission(self, entry)

    async def generate(self, req: OmniDiffusionRequest, progress: ProgressCallback | None = None,
                       **limits) -> DiffusionOutput:
        """submit(), then wait for the output (cancelling the wait cancels the request)."""
        return await self.submit(req, progress, **limits).wait()

    def run_all(self, requests: list[OmniDiffusionRequest]) -> list[DiffusionOutput]:
        """Offline: admit every request (InvalidRequestError before anything is queued), queue them
        together (so the batches are those one engine would form) and block until each has its
        output; one output per request, in order. The replicas run the batches at once."""
        admitted = [self.admit(req) for req in requests]
        for req in admitted:
            self.engine.warn_if_large(req)
        with self._cond:
            self._refuse_if_unavailable()
            if self.max_queue is not None and len(self.scheduler) + len(admitted) > self.max_queue:
                raise QueueFullError(f"{len(admitted)} requests do not fit the queue of {self.max_queue}")
            entries = [self.scheduler.add(req, _Caller(None, None, None, None)) for req in admitted]
            self._cond.notify_all()
        return [entry.handle.future.result() for entry in entries]

    def _cancel(self, entry: ScheduledRequest) -> None:
        """The caller went away: leave the queue now, or stop the running batch if nobody else waits."""
        with self._cond:
            entry.cancelled = True
            self.scheduler.remove(entry)
            for replica in self.replicas:
                if entry in replica.running and all(e.cancelled for e in replica.running):
                    self._stop_batch(replica)

    # -- the runner threads, one per replica ------------------------------------------------------

    def _serve(self, replica: Replica) -> None:
        source, replica.source = replica.source, None
        try:
            engine = source if isinstance(source, DiffusionEngine) else source()
            if self.warmup is not None and not isinstance(source, DiffusionEngine):
                self.warmup(engine)
        except Exception as exc:
            self._load_failed(replica, exc)
            return
        with self._cond:
            stopped = not self._running
            if not stopped:
                replica.engine = engine
                if self.scheduler is None:
                    self.scheduler = engine.make_scheduler(self.max_queue)
                    self.engine = engine
                replica.status = "ready"
                self._cond.notify_all()
        self._load_finished()
        if stopped:  # shut down while this replica loaded: nobody else will stop its workers
            engine.shutdown()
            return
        if len(self.replicas) > 1:
            logger.info("replica %d of %d is serving", replica.index, len(self.replicas))
        self._loop(replica)

    def _load_failed(self, replica: Replica, exc: Exception) -> None:
        logger.exception("replica %d: the model failed to load", replica.index, exc_info=exc)
        with self._cond:
            replica.status = "failed"
            first = self.load_error is None
            if first:
                where = f" (replica {replica.index})" if len(self.replicas) > 1 else ""
                self.load_error = f"{type(exc).__name__}: {exc}{where}"
                self.load_exception = exc
                self._answer_waiting("the model failed to load", "unavailable")
            self._cond.notify_all()
        self._load_finished()
        if first and self.on_load_failure is not None:
            self.on_load_failure()

    def _load_finished(self) -> None:
        self._loaded.set()
        with self._cond:
            self._loads_pending -= 1
            if self._loads_pending == 0:
                self._all_loaded.set()

    def _loop(self, replica: Replica) -> None:
        if replica.engine.od_config.batching == "step":
            run_steps(self, replica)
            return
        while True:
            batch = self._next_batch(replica)
            if batch is None:
                return
            try:
                self._run(replica, batch)
            except Exception as exc:  # never let a runner thread die silently
                logger.exception("replica %d failed on a batch", replica.index)
                for entry in batch.entries:
                    self._resolve(entry, DiffusionOutput(request_id=entry.req.request_id, error=str(exc),
                                                         error_type="internal"))
            if not replica.engine.is_healthy() and self._running:
                self._recover(replica)
                if not self._running:  # shut down while it restarted: the new workers are this thread's
                    replica.engine.shutdown()

    def _next_batch(self, replica: Replica) -> Batch | None:
        """The next batch for this (free) replica; None when the engine stops or the replica failed."""
        with self._cond:
            replica.idle_since = time.monotonic()
            batch = None
            while batch is None:
                while self._running and replica.status != "failed" and not (
                        len(self.scheduler) and self._first_in_line(replica)):
                    self._cond.wait()
                if not self._running or replica.status == "failed":
                    replica.idle_since = None
                    self._cond.notify_all()  # the next idle replica in line takes over
                    return None
                batch = self.scheduler.start_batch()
            replica.idle_since = None
            # What is left in the queue is now the next idle replica's to take.
            self._cond.notify_all()
            deadline = time.monotonic() + self.batch_wait_s
            while batch.num_prompts < self.scheduler.max_batch_size and self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                self.scheduler.fill(batch)
            live = [e for e in batch.entries if not e.cancelled]
            now = time.monotonic()
            for entry in live:
                entry.handle.started_at = now
            replica.running = live
            replica.last_progress = now
            replica.status = "busy"
            return Batch(batch.key, live)

    def _first_in_line(self, replica: Replica) -> bool:
        """Whether `replica` takes the next batch: of the replicas waiting for work (all equally
        loaded: they run nothing), the one that has waited longest."""
        idle = [r for r in self.replicas if r.idle_since is not None and r.status != "failed"]
        return min(idle, key=lambda r: (r.idle_since, r.index)) is replica

    def _run(self, replica: Replica, batch: Batch) -> None:
        live = batch.entries
        if not live:
            self._finish_batch(replica)
            return

        def progress(done: int, total: int) -> None:
            replica.last_progress = time.monotonic()
            replica.completed_steps += 1
            for entry in live:
                if entry.handle.progress is not None and not entry.cancelled:
                    entry.handle.progress(done, total)

        start = time.monotonic()
        try:
            outputs = replica.engine.run_batch([e.req for e in live], progress)
        finally:
            self._finish_batch(replica)
        elapsed = time.monotonic() - start
        answered = self._answer(replica, list(zip(live, outputs)))
        if self.on_batch is not None and answered:
            self.on_batch([e.req for e, _ in answered], [out for _, out in answered], elapsed)

    def _answer(self, replica: Replica, results: list[tuple[ScheduledRequest, DiffusionOutput]]
                ) -> list[tuple[ScheduledRequest, DiffusionOutput]]:
        """Resolve each caller with its output, except requests whose replica died under them, which go
        back to the queue once (_may_run_again); the pairs answered."""
        replica_died = not replica.engine.is_healthy()
        answered, again = [], []
        for entry, out in results:
            out.metrics["replica"] = replica.index
            if replica_died and self._may_run_again(entry, out):
                again.append(entry)
                continue
            if entry.handle.started_at is not None:
                out.metrics["queue_s"] = entry.handle.started_at - entry.enqueued_at
            # A request the watchdog stopped (timeout, shutdown) reports why, not "aborted".
            self._resolve(entry, entry.handle.stop_reason or out)
            answered.append((entry, out))
        if again:
            logger.warning("replica %d failed running %d request(s); they go back to the queue for another "
                           "replica", replica.index, len(again))
            with self._cond:
                self.scheduler.requeue(again)
                self._cond.notify_all()
        return answered

    @staticmethod
    def _stop_batch(replica: Replica) -> None:
        """Its requests are all cancelled: under batching="request" the batch stops at its next step (or
        block). Under batching="step" the runner drops them at the next step boundary itself (an abort
        would fail the step of requests that join meanwhile)."""
        if replica.engine.od_config.batching == "request":
            replica.engine.executor.request_abort()

    def _may_run_again(self, entry: ScheduledRequest, out: DiffusionOutput) -> bool:
        """A request whose replica died under it runs again elsewhere, once: not one that finished,
        was stopped or cancelled, and not twice (a request that kills every replica it runs on must
        not take the whole engine down)."""
        return (self._requeue_on_replica_failure and out.error_type == "internal" and not entry.cancelled
                and entry.handle.stop_reason is None and entry.requeued == 0 and self._running)

    def _finish_batch(self, replica: Replica) -> None:
        with self._cond:
            replica.running = []
            if replica.status == "busy":
                # A dead group takes no more work; _recover decides what happens to it.
                replica.status = "ready" if replica.engine.is_healthy() else "recovering"

    def _recover(self, replica: Replica) -> None:
        """Restart this replica's worker group (weights reloaded); the others keep serving."""
        now = time.monotonic()
        replica.restart_times = [t for t in replica.restart_times if now - t < self.restart_window_s] + [now]
        if len(replica.restart_times) > self.max_restarts:
            logger.error("replica %d: its workers failed %d times in %.0f s; not restarting them again",
                         replica.index, len(replica.restart_times), self.restart_window_s)
            self._fail_replica(replica)
            return
        with self._cond:
            replica.status = "recovering"
            replica.restarts += 1
        logger.warning("replica %d: restarting its worker group", replica.index)
        try:
            replica.engine.restart()
        except Exception:
            logger.exception("replica %d: the worker group could not be restarted", replica.index)
            self._fail_replica(replica)
            return
        with self._cond:
            if replica.status == "recovering":
                replica.status = "ready"
            self._cond.notify_all()
        logger.info("replica %d: the worker group is serving again", replica.index)

    def _fail_replica(self, replica: Replica) -> None:
        with self._cond:
            self._fail_replica_locked(replica)

    def _fail_replica_locked(self, replica: Replica) -> None:
        """This replica serves no more; once none can, nothing queued would ever run: answer it."""
        replica.status = "failed"
        if all(r.status == "failed" for r in self.replicas):
            self._answer_waiting("the engine failed and could not recover; the server needs a restart",
                                 "unavailable")
        self._cond.notify_all()

    # -- the watchdog thread ----------------------------------------------------------------------

    def _watch(self) -> None:
        while self._running:
            time.sleep(0.2)
            with self._cond:
                if self.scheduler is not None:
                    self._expire_queued()
                    for replica in self.replicas:
                        self._stop_overdue_running(replica)

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for entry in self.scheduler.waiting():
            limit = entry.handle.queue_timeout_s
            if limit is not None and now - entry.enqueued_at > limit:
                self.scheduler.remove(entry)
                self._resolve(entry, _stopped(entry, f"the request waited more than {limit:.0f} s in the queue",
                                              "timeout"))

    def _stop_overdue_running(self, replica: Replica) -> None:
        batch, now = replica.running, time.monotonic()
        if not batch:
            return
        for entry in batch:
            limit = entry.handle.run_timeout_s
            if limit is not None and not entry.cancelled and now - entry.handle.started_at > limit:
                entry.cancelled = True
                entry.handle.stop_reason = _stopped(entry, f"the request ran longer than {limit:.0f} s", "timeout")
        if self._drain_deadline is not None and now > self._drain_deadline:
            for entry in batch:
                if not entry.cancelled:
                    entry.cancelled = True
                    entry.handle.stop_reason = _stopped(entry, "the server is shutting down", "unavailable")
        if all(e.cancelled for e in batch):
            self._stop_batch(replica)
        if self.step_timeout_s is not None and now - replica.last_progress > self.step_timeout_s:
            self._declare_wedged(replica)

    def _declare_wedged(self, replica: Replica) -> None:
        """No step finished for step_timeout_s: a hung rank or kernel. Worker processes are killed
        (the batch fails and the group restarts); an in-process worker cannot be, so the replica fails."""
        logger.error("replica %d: no denoise step completed within %.0f s", replica.index, self.step_timeout_s)
        replica.last_progress = time.monotonic()
        if not replica.engine.kill_workers():
            self._fail_replica_locked(replica)

    # -- answers and shutdown ---------------------------------------------------------------------

    @staticmethod
    def _resolve(entry: ScheduledRequest, output: DiffusionOutput) -> None:
        caller: _Caller = entry.handle

        def set_result() -> None:
            if not caller.future.done():
                caller.future.set_result(output)

        if caller.loop is None:
            try:
                set_result()
            except concurrent.futures.InvalidStateError:  # answered meanwhile by another thread
                pass
            return
        try:
            caller.loop.call_soon_threadsafe(set_result)
        except RuntimeError:  # the caller's event loop is closed
            pass

    def _answer_waiting(self, message: str, error_type: str) -> None:
        """Answer and empty the queue (under the condition)."""
        for entry in self.scheduler.drain() if self.scheduler is not None else []:
            self._resolve(entry, _stopped(entry, message, error_type))

    def drain(self, grace_s: float) -> None:
        """Stop taking work (503), answer everything queued with 503, and stop the running batches if
        they have not finished within `grace_s`. Thread-safe (called from a signal handler's thread)."""
        with self._cond:
            self._draining = True
            self._drain_deadline = time.monotonic() + grace_s
            self._answer_waiting("the server is shutting down", "unavailable")
            self._cond.notify_all()
        logger.info("draining: admission stopped; running batches get %.0f s to finish", grace_s)

    def start_profile(self, trace_dir: str) -> None:
        """Profile every replica's workers (call while no request runs); with several replicas each
        writes its traces under trace_dir/replica<N> (their ranks have the same numbers)."""
        for replica in self.replicas:
            where = trace_dir if len(self.replicas) == 1 else os.path.join(trace_dir, f"replica{replica.index}")
            self._replica_engine(replica).start_profile(where)

    def stop_profile(self) -> list[str]:
        return [path for replica in self.replicas for path in self._replica_engine(replica).stop_profile()]

    @staticmethod
    def _replica_engine(replica: Replica) -> DiffusionEngine:
        if replica.engine is None:
            raise EngineUnavailable(f"replica {replica.index} is {replica.status}")
        return replica.engine

    def shutdown(self) -> None:
        with self._cond:
            self._running = False
            for replica in self.replicas:
                for entry in replica.running:
                    entry.cancelled = True
                if replica.running:
                    self._stop_batch(replica)
            self._cond.notify_all()
        deadline = time.monotonic() + 30
        for replica in self.replicas:
            replica.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._answer_waiting("the server is shutting down", "unavailable")
        for replica in self.replicas:
            if replica.engine is not None:
                replica.engine.shutdown()


def _stopped(entry: ScheduledRequest, message: str, error_type: str) -> DiffusionOutput:
    return DiffusionOutput(request_id=entry.req.request_id, error=message, error_type=error_type)
