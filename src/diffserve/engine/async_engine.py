"""The serving front of the engine: the scheduler (diffserve.engine.scheduler) behind a thread.

Callers (the HTTP server) `await generate(request)`: the request is admitted against the model's
spec at once (InvalidRequestError: a 400) and queued; a full queue is refused at once
(QueueFullError: a 429). The scheduler thread starts a batch with the oldest request, waits up to
`batch_wait_ms` for compatible ones to fill it to `max_batch_size` prompts, runs it, and resolves each
caller's future. A caller that goes away (client disconnect or timeout) is dropped if still queued;
a running batch whose callers are all gone stops at the next denoise step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from diffserve.engine.engine import DiffusionEngine, RequestAborted
from diffserve.engine.scheduler import Batch, QueueFullError, ScheduledRequest
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

__all__ = ["AsyncDiffusionEngine", "QueueFullError"]


class _Caller:
    """What the scheduler thread needs to answer one waiting caller."""

    def __init__(self, loop: asyncio.AbstractEventLoop, progress: ProgressCallback | None):
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.progress = progress


class AsyncDiffusionEngine:
    def __init__(
        self,
        engine: DiffusionEngine,
        max_queue: int = 256,
        batch_wait_ms: float = 5.0,
        on_batch: Callable[[list[OmniDiffusionRequest], list[DiffusionOutput], float], None] | None = None,
    ):
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.engine = engine
        self.scheduler = engine.make_scheduler(max_queue)
        self.batch_wait_s = batch_wait_ms / 1000
        self.on_batch = on_batch
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="diffserve-scheduler", daemon=True)
        self._thread.start()

    @property
    def spec(self):
        return self.engine.spec

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler)

    def is_healthy(self) -> bool:
        return self._running and self._thread.is_alive() and self.engine.is_healthy()

    async def generate(self, req: OmniDiffusionRequest, progress: ProgressCallback | None = None) -> DiffusionOutput:
        """Admit and queue `req`, then wait for its output. `progress(done, total)` runs on the
        engine thread. Raises InvalidRequestError or QueueFullError before anything is queued."""
        admitted = self.scheduler.admit(req)
        caller = _Caller(asyncio.get_running_loop(), progress)
        with self._cond:
            if not self._running:
                raise RuntimeError("the engine is shut down")
            entry = self.scheduler.add(admitted, caller)
            self._cond.notify()
        try:
            return await caller.future
        except asyncio.CancelledError:
            entry.cancelled = True
            raise

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
            return batch

    def _run(self, batch: Batch) -> None:
        live = [e for e in batch.entries if not e.cancelled]
        if not live:
            return

        def progress(done: int, total: int) -> None:
            for entry in live:
                if entry.handle.progress is not None and not entry.cancelled:
                    entry.handle.progress(done, total)
            if all(entry.cancelled for entry in live):
                raise RequestAborted("every caller of this request went away")

        start = time.monotonic()
        outputs = self.engine.run_batch([e.req for e in live], progress)
        elapsed = time.monotonic() - start
        for entry, out in zip(live, outputs):
            out.metrics["queue_s"] = start - entry.enqueued_at
            self._resolve(entry, out)
        if self.on_batch is not None:
            self.on_batch([e.req for e in live], outputs, elapsed)

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

    def shutdown(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=30)
        with self._cond:
            waiting = self.scheduler.drain()
        for entry in waiting:
            self._resolve(entry, DiffusionOutput(request_id=entry.req.request_id, error="the server is shutting down",
                                                 error_type="internal"))
        self.engine.shutdown()
