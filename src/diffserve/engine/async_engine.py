"""The serving front of the engine: the scheduler (diffserve.engine.scheduler) behind a thread, with
the engine's health, its recovery and its shutdown.

Callers (the HTTP server) `await generate(request)`: the request is admitted against the model's spec
at once (InvalidRequestError: a 400; over the work budget: a 400 naming the limit), refused when the
queue is full (QueueFullError: 429) or the engine cannot take work (EngineUnavailable: 503), and
queued. The scheduler thread starts a batch with the oldest request, waits up to `batch_wait_ms` for
compatible ones, runs it, and resolves each caller's future.

Nothing accepted is lost or left hanging:
- a caller that goes away leaves the queue at once; if it was running and every caller of its batch
  is gone, the batch stops at its next step (or block);
- a request carries its own deadlines: time in the queue and time running, each ending it with a
  timeout error (the watchdog thread enforces them, and aborts the running batch when needed);
- a failed worker group (a rank died, raised, or made no progress for `step_timeout_s`) fails the
  batch it was running, then restarts with its weights reloaded while new work gets 503; queued work
  runs after the restart;
- `drain(grace_s)` (SIGTERM) stops admission, answers everything queued with 503, lets the running
  batch finish within the grace period and stops it after.

States (`status`): starting -> ready <-> busy; recovering after a failure; draining; failed when the
engine cannot recover (a hung in-process worker, or a restart that fails).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from diffserve.engine.engine import DiffusionEngine, format_duration
from diffserve.engine.errors import EngineUnavailable
from diffserve.engine.scheduler import Batch, QueueFullError, ScheduledRequest
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

__all__ = ["AsyncDiffusionEngine", "EngineUnavailable", "QueueFullError", "WorkBudgetError"]

RETRY_AFTER_RECOVERY_S = 30.0
RETRY_AFTER_LOADING_S = 5.0


class WorkBudgetError(ValueError):
    """A request whose estimated work exceeds what this server accepts."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class _Caller:
    """What the scheduler thread needs to answer one waiting caller."""

    def __init__(self, loop: asyncio.AbstractEventLoop, progress: ProgressCallback | None,
                 queue_timeout_s: float | None, run_timeout_s: float | None):
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
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


class AsyncDiffusionEngine:
    """`engine`: a DiffusionEngine, or a function that builds one. A function runs in the scheduler
    thread (status "starting" meanwhile): worker processes die with the thread that started them, so
    they must be started by a thread that lives as long as the engine."""

    def __init__(
        self,
        engine: DiffusionEngine | Callable[[], DiffusionEngine],
        max_queue: int = 256,
        batch_wait_ms: float = 5.0,
        on_batch: Callable[[list[OmniDiffusionRequest], list[DiffusionOutput], float], None] | None = None,
        step_timeout_s: float | None = 600.0,
        max_restarts: int = 3,
        restart_window_s: float = 600.0,
        warmup: Callable[[DiffusionEngine], None] | None = None,
    ):
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine: DiffusionEngine | None = None
        self.scheduler = None
        self.max_queue = max_queue
        self.load_error: str | None = None
        self.on_load_failure: Callable[[], None] | None = None
        self.batch_wait_s = batch_wait_ms / 1000
        # Run once the model has loaded, before the engine takes work (e.g. compile for the shapes a
        # server expects, so no request pays a compile stall).
        self.warmup = warmup
        self.on_batch = on_batch
        self.step_timeout_s = step_timeout_s
        # More than max_restarts within restart_window_s: something is broken for good ("failed").
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self._restart_times: list[float] = []
        self.completed_steps = 0
        self.status = "starting"
        self._cond = threading.Condition()
        self._running = True
        self._running_batch: list[ScheduledRequest] = []
        self._loaded = threading.Event()
        self._last_progress = time.monotonic()
        self._drain_deadline: float | None = None
        self._thread = threading.Thread(target=self._serve, args=(engine,), name="diffserve-scheduler", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="diffserve-watchdog", daemon=True)
        self._thread.start()
        self._watchdog.start()
        if isinstance(engine, DiffusionEngine):
            self._loaded.wait()

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
        return self._loaded.wait(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler) if self.scheduler is not None else 0

    @property
    def running_requests(self) -> int:
        return len(self._running_batch)

    def is_healthy(self) -> bool:
        return self.status in ("ready", "busy") and self._thread.is_alive()

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
        self._ready_engine()
        if not self._running or self.status == "draining":
            raise EngineUnavailable("the server is shutting down")
        if self.status == "recovering":
            raise EngineUnavailable("the engine is restarting its workers after a failure; retry shortly",
                                    retry_after_s=RETRY_AFTER_RECOVERY_S)
        if self.status == "failed":
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
        total)` runs on the engine thread."""
        admitted = self.admit(req, max_seconds)
        caller = _Caller(asyncio.get_running_loop(), progress, queue_timeout_s, run_timeout_s)
        with self._cond:
            self._refuse_if_unavailable()
            entry = self.scheduler.add(admitted, caller)
            self._cond.notify()
        return Submission(self, entry)

    async def generate(self, req: OmniDiffusionRequest, progress: ProgressCallback | None = None,
                       **limits) -> DiffusionOutput:
        """submit(), then wait for the output (cancelling the wait cancels the request)."""
        return await self.submit(req, progress, **limits).wait()

    def _cancel(self, entry: ScheduledRequest) -> None:
        """The caller went away: leave the queue now, or stop the running batch if nobody else waits."""
        with self._cond:
            entry.cancelled = True
            self.scheduler.remove(entry)
            if entry in self._running_batch and all(e.cancelled for e in self._running_batch):
                self.engine.executor.request_abort()

    # -- the scheduler thread ---------------------------------------------------------------------

    def _serve(self, engine) -> None:
        if not isinstance(engine, DiffusionEngine):
            try:
                engine = engine()
                if self.warmup is not None:
                    self.warmup(engine)
            except Exception as exc:
                logger.exception("the model failed to load")
                self.load_error = f"{type(exc).__name__}: {exc}"
                self.status = "failed"
                self._loaded.set()
                if self.on_load_failure is not None:
                    self.on_load_failure()
                return
        with self._cond:
            self.scheduler = engine.make_scheduler(self.max_queue)
            self.engine = engine
            if self.status == "starting":
                self.status = "ready"
        self._loaded.set()
        self._loop()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # never let the scheduler thread die silently
                logger.exception("scheduler failed on a batch")
                for entry in batch.entries:
                    self._resolve(entry, DiffusionOutput(request_id=entry.req.request_id, error=str(exc),
                                                         error_type="internal"))
            if not self.engine.is_healthy() and self._running:
                self._recover()

    def _next_batch(self) -> Batch | None:
        with self._cond:
            batch = None
            while batch is None:
                while self._running and not len(self.scheduler):
                    self._cond.wait()
                if not self._running:
                    return None
                batch = self.scheduler.start_batch()
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
            self._running_batch = live
            self._last_progress = now
            self.status = "busy"
            return Batch(batch.key, live)

    def _run(self, batch: Batch) -> None:
        live = batch.entries
        if not live:
            self._finish_batch()
            return

        def progress(done: int, total: int) -> None:
            self._last_progress = time.monotonic()
            self.completed_steps += 1
            for entry in live:
                if entry.handle.progress is not None and not entry.cancelled:
                    entry.handle.progress(done, total)

        start = time.monotonic()
        try:
            outputs = self.engine.run_batch([e.req for e in live], progress)
        finally:
            self._finish_batch()
        elapsed = time.monotonic() - start
        for entry, out in zip(live, outputs):
            out.metrics["queue_s"] = start - entry.enqueued_at
            # A request the watchdog stopped (timeout, shutdown) reports why, not "aborted".
            self._resolve(entry, entry.handle.stop_reason or out)
        if self.on_batch is not None:
            self.on_batch([e.req for e in live], outputs, elapsed)

    def _finish_batch(self) -> None:
        with self._cond:
            self._running_batch = []
            if self.status == "busy":
                self.status = "ready"

    def _recover(self) -> None:
        """Restart the worker group (weights reloaded); new work gets 503 meanwhile."""
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < self.restart_window_s] + [now]
        if len(self._restart_times) > self.max_restarts:
            logger.error("the workers failed %d times in %.0f s; not restarting them again",
                         len(self._restart_times), self.restart_window_s)
            self.status = "failed"
            return
        self.status = "recovering"
        logger.warning("restarting the worker group")
        try:
            self.engine.restart()
        except Exception:
            logger.exception("the worker group could not be restarted")
            self.status = "failed"
            return
        with self._cond:
            if self.status == "recovering":
                self.status = "ready"
            self._cond.notify_all()
        logger.info("the worker group is serving again")

    # -- the watchdog thread ----------------------------------------------------------------------

    def _watch(self) -> None:
        while self._running:
            time.sleep(0.2)
            with self._cond:
                if self.engine is not None:
                    self._expire_queued()
                    self._stop_overdue_running()

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for entry in self.scheduler.waiting():
            limit = entry.handle.queue_timeout_s
            if limit is not None and now - entry.enqueued_at > limit:
                self.scheduler.remove(entry)
                self._resolve(entry, _stopped(entry, f"the request waited more than {limit:.0f} s in the queue",
                                              "timeout"))

    def _stop_overdue_running(self) -> None:
        batch, now = self._running_batch, time.monotonic()
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
            self.engine.executor.request_abort()
        if self.step_timeout_s is not None and now - self._last_progress > self.step_timeout_s:
            self._declare_wedged()

    def _declare_wedged(self) -> None:
        """No step finished for step_timeout_s: a hung rank or kernel. Worker processes are killed
        (the batch fails and the group restarts); an in-process worker cannot be, so the engine fails."""
        logger.error("no denoise step completed within %.0f s", self.step_timeout_s)
        self._last_progress = time.monotonic()
        if not self.engine.kill_workers():
            self.status = "failed"

    # -- answers and shutdown ---------------------------------------------------------------------

    @staticmethod
    def _resolve(entry: ScheduledRequest, output: DiffusionOutput) -> None:
        caller: _Caller = entry.handle

        def set_result() -> None:
            if not caller.future.done():
                caller.future.set_result(output)

        try:
            caller.loop.call_soon_threadsafe(set_result)
        except RuntimeError:  # the caller's event loop is closed
            pass

    def drain(self, grace_s: float) -> None:
        """Stop taking work (503), answer everything queued with 503, and stop the running batch if it
        has not finished within `grace_s`. Thread-safe (called from a signal handler's thread)."""
        with self._cond:
            self.status = "draining"
            self._drain_deadline = time.monotonic() + grace_s
            for entry in self.scheduler.drain() if self.scheduler is not None else []:
                self._resolve(entry, _stopped(entry, "the server is shutting down", "unavailable"))
            self._cond.notify_all()
        logger.info("draining: admission stopped; the running batch gets %.0f s to finish", grace_s)

    def shutdown(self) -> None:
        with self._cond:
            self._running = False
            for entry in self._running_batch:
                entry.cancelled = True
            if self._running_batch:
                self.engine.executor.request_abort()
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if self.engine is None:
            return
        with self._cond:
            waiting = self.scheduler.drain()
        for entry in waiting:
            self._resolve(entry, _stopped(entry, "the server is shutting down", "unavailable"))
        self.engine.shutdown()


def _stopped(entry: ScheduledRequest, message: str, error_type: str) -> DiffusionOutput:
    return DiffusionOutput(request_id=entry.req.request_id, error=message, error_type=error_type)
