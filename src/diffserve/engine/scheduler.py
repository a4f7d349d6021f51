"""The scheduler: admission and batch formation, one for the offline engine and the server.

Requests are admitted against the model's SamplingSpec (diffserve.engine.admission) and queued in
arrival order. A batch starts with the oldest live request and takes every later one with the same
batch key, up to `max_batch_size` prompts; the server's engine may `fill` a batch again while it
waits a few milliseconds for more. Merging and splitting keep each request's outputs its own.

The scheduler holds no lock: the async engine calls it under its condition variable, the offline
engine from one thread.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from diffserve.engine.admission import admit, batch_key
from diffserve.models.spec import SamplingSpec
from diffserve.request import DiffusionOutput, OmniDiffusionRequest


class QueueFullError(RuntimeError):
    """The request queue is at its bound; retry later."""


@dataclass(eq=False)
class ScheduledRequest:
    """One admitted request waiting for (or in) a batch. `handle` is the caller's (e.g. a future)."""

    req: OmniDiffusionRequest
    key: tuple
    handle: Any = None
    enqueued_at: float = field(default_factory=time.monotonic)
    # Set when the caller is gone (from another thread); a cancelled request is dropped, and a running
    # batch whose requests are all cancelled stops at the next step.
    cancelled: bool = False
    # Times it was put back in the queue because the replica running it failed (see requeue).
    requeued: int = 0
    # batching="step": steps run while it waited with a key other than the running batch's (fairness).
    waited_steps: int = 0

    @property
    def num_prompts(self) -> int:
        return len(self.req.prompts)


@dataclass(eq=False)
class Batch:
    key: tuple
    entries: list[ScheduledRequest]

    @property
    def num_prompts(self) -> int:
        return sum(e.num_prompts for e in self.entries)

    @property
    def requests(self) -> list[OmniDiffusionRequest]:
        return [e.req for e in self.entries]


class Scheduler:
    """`key(spec, req)`: which requests may share a batch (batch_key; step batching passes its step_key)."""

    def __init__(self, spec: SamplingSpec, max_batch_size: int, max_queue: int | None = None,
                 key: Callable[[SamplingSpec, OmniDiffusionRequest], tuple] = batch_key):
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.spec = spec
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.key = key
        self._waiting: deque[ScheduledRequest] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def admit(self, req: OmniDiffusionRequest) -> OmniDiffusionRequest:
        """`req` resolved against the model's spec, or InvalidRequestError (nothing is queued)."""
        return admit(self.spec, req)

    def add(self, req: OmniDiffusionRequest, handle: Any = None) -> ScheduledRequest:
        """Queue an admitted request."""
        if self.max_queue is not None and len(self._waiting) >= self.max_queue:
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
        entry = ScheduledRequest(req, self.key(self.spec, req), handle)
        self._waiting.append(entry)
        return entry

    def start_batch(self) -> Batch | None:
        """The oldest live request and every compatible one behind it, or None if none waits."""
        while self._waiting:
            first = self._waiting.popleft()
            if not first.cancelled:
                batch = Batch(first.key, [first])
                self.fill(batch)
                return batch
        return None

    def fill(self, batch: Batch) -> None:
        """Move waiting requests with the batch's key into it, in arrival order, while they fit."""
        size = batch.num_prompts
        for entry in list(self._waiting):
            if size >= self.max_batch_size:
                break
            if entry.cancelled:
                self._waiting.remove(entry)
            elif entry.key == batch.key and size + entry.num_prompts <= self.max_batch_size:
                self._waiting.remove(entry)
                batch.entries.append(entry)
                size += entry.num_prompts

    def requeue(self, entries: list[ScheduledRequest]) -> None:
        """Put accepted requests back at the head of the queue, oldest first (the replica running them
        died: they run again on another). The queue bound does not apply: they were accepted before."""
        for entry in reversed(entries):
            entry.requeued += 1
            self._waiting.appendleft(entry)

    def remove(self, entry: ScheduledRequest) -> bool:
        """Take `entry` out of the queue (its caller left); False if it is not waiting."""
        try:
            self._waiting.remove(entry)
        except ValueError:
            return False
        return True

    def waiting(self) -> list[ScheduledRequest]:
        return list(self._waiting)

    def drain(self) -> list[ScheduledRequest]:
        """Remove and return everything still waiting (on shutdown)."""
        waiting = list(self._waiting)
        self._waiting.clear()
        return waiting


def merge_requests(batch: list[OmniDiffusionRequest]) -> OmniDiffusionRequest:
    if len(batch) == 1:
        return batch[0]
    prompts = [p for req in batch for p in req.prompts]
    return OmniDiffusionRequest(prompts=prompts, sampling_params=batch[0].sampling_params)


def _slice(value, start: int, stop: int):
    return None if value is None else value[start:stop]


def split_output(output: DiffusionOutput, batch: list[OmniDiffusionRequest]) -> list[DiffusionOutput]:
    """One output per request of the batch; list/array/tensor outputs are sliced by prompt count."""
    results = []
    start = 0
    per_prompt = batch[0].sampling_params.num_outputs_per_prompt
    for req in batch:
        stop = start + len(req.prompts) * per_prompt
        results.append(
            dataclasses.replace(
                output,
                output=_slice(output.output, start, stop),
                images=_slice(output.images, start, stop),
                frames=_slice(output.frames, start, stop),
                audio=_slice(output.audio, start, stop),
                request_id=req.request_id,
                prompt=req.prompts[0].prompt if len(req.prompts) == 1 else None,
                seed=req.prompts[0].seed if len(req.prompts) == 1 else None,
                metrics={**output.metrics, "batch_size": len(batch)},
            )
        )
        start = stop
    return results
