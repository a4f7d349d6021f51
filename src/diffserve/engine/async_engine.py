"""The serving front of the engine: a bounded request queue and a batching scheduler thread.

Callers (the HTTP server) `await generate(request)`. A scheduler thread takes the oldest request,
waits up to `batch_wait_ms` for compatible ones (same size, frames, steps, guidance) to fill a
batch of `max_batch_size` prompts, runs it, and resolves each caller's future. A full queue is
refused at once (the server answers 429). A caller that goes away (cancelled: client disconnect or
timeout) is dropped if still queued; a running in-process batch whose callers are all gone stops at
the next denoise step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from diffserve.engine.engine import DiffusionEngine, RequestAborted
from diffserve.engine.scheduler import batch_key
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class QueueFullError(RuntimeError):
    """The request queue is at its bound; retry later."""


@dataclass
class _Pending:
    req: OmniDiffusionRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    progress: ProgressCallback | None
    enqueued_at: float = field(default_factory=time.monotonic)
    # Set from the event loop when the caller is gone; read by the scheduler thread.
    cancelled: bool = False


class AsyncDiffusionEngine:
    def __init__(
        self,
        engine: DiffusionEngine,
        max_queue: int = 256,
        batch_wait_ms: float = 5.0,
        on_batch: Callable[[list[OmniDiffusionRequest], list[DiffusionOutput], float], None] | None = None,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.engine = engine
        self.max_batch_size = engine.od_config.max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="diffserve-scheduler", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def is_healthy(self) -> bool:
        return self._running and self._thread.is_alive() and self.engine.is_healthy()

    async def generate(self, req: OmniDiffusionRequest, progress: ProgressCallback | None = None) -> DiffusionOutput:
        """Queue `req` and wait for its output. `progress(done, total)` runs on the engine thread."""
        loop = asyncio.get_running_loop()
        pending = _Pending(req, loop.create_future(), loop, progress)
        with self._cond:
            if not self._running:
                raise RuntimeError("the engine is shut down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._queue.append(pending)
            self._cond.notify()
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.cancelled = True
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
                for p in batch:
                    self._resolve(p, DiffusionOutput(request_id=p.req.request_id, error=str(exc), error_type="internal"))

    def _take_live(self) -> _Pending | None:
        while self._queue:
            p = self._queue.popleft()
            if not p.cancelled:
                return p
        return None

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            first = None
            while first is None:
                while self._running and not self._queue:
                    self._cond.wait()
                if not self._running:
                    return None
                first = self._take_live()
            batch, key, size = [first], batch_key(first.req), len(first.req.prompts)
            deadline = time.monotonic() + self.batch_wait_s
            while size < self.max_batch_size:
                for p in list(self._queue):
                    if p.cancelled:
                        self._queue.remove(p)
                    elif batch_key(p.req) == key and size + len(p.req.prompts) <= self.max_batch_size:
                        self._queue.remove(p)
                        batch.append(p)
                        size += len(p.req.prompts)
                remaining = deadline - time.monotonic()
                if size >= self.max_batch_size or remaining <= 0 or not self._running:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.cancelled]
        if not live:
            return

        def progress(done: int, total: int) -> None:
            for p in live:
                if p.progress is not None and not p.cancelled:
                    p.progress(done, total)
            if all(p.cancelled for p in live):
                raise RequestAborted("every caller of this request went away")

        start = time.monotonic()
        outputs = self.engine.run_batch([p.req for p in live], progress)
        elapsed = time.monotonic() - start
        for p, out in zip(live, outputs):
            out.metrics["queue_s"] = start - p.enqueued_at
            self._resolve(p, out)
        if self.on_batch is not None:
            self.on_batch([p.req for p in live], outputs, elapsed)

    @staticmethod
    def _resolve(p: _Pending, output: DiffusionOutput) -> None:
        def set_result() -> None:
            if not p.future.done():
                p.future.set_result(output)

        try:
            p.loop.call_soon_threadsafe(set_result)
        except RuntimeError:  # the caller's event loop is closed
            pass

    def shutdown(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=30)
        for p in list(self._queue):
            self._resolve(p, DiffusionOutput(request_id=p.req.request_id, error="the server is shutting down",
                                             error_type="internal"))
        self._queue.clear()
        self.engine.shutdown()
