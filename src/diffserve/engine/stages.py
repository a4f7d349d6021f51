"""batching="step": each request's begin (encode, prepare) and finish (decode, post-process) jobs, run
inline on the step thread, or overlapped with the running batch's steps (step_overlap_stages).

Overlapped, one background thread runs the jobs in submission order, on its own CUDA stream on a GPU,
while the step thread keeps stepping the running batch; the step thread picks the results up at step
boundaries (`collect`). Stream order:

- a job's stream first waits for an event the step thread recorded on its stream when it submitted the
  job (a finish job reads the latents the last step wrote);
- a begin's result is handed over with an event recorded after the job: the step thread's stream
  waits for it before the state is stepped (`hand_over`), and the state's tensors, allocated on the
  side stream, are recorded as used on the step thread's stream so that their memory is not reused by
  the side stream before the steps that read them have run;
- a finish job synchronizes its stream before its output leaves, so the output is ready for whoever
  reads it, and the run's tensors (the compute stream's latents among them) are no longer read when
  they are freed.
"""

from __future__ import annotations

import pickle
import queue
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn


@dataclass
class StageResult:
    kind: str  # "begin" or "finish"
    request_id: str
    value: Any = None
    error: Exception | None = None
    ready: torch.cuda.Event | None = None  # recorded on the side stream after the job


class StageJobs:
    def __init__(self, device: torch.device, overlap: bool):
        self.device = device
        self.pending: set[str] = set()  # request ids whose job has not been collected
        self._done: queue.SimpleQueue[StageResult] = queue.SimpleQueue()
        self._stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        # The thread's current device is the worker's (code that allocates on "cuda" means it).
        initializer = (lambda: torch.cuda.set_device(device)) if self._stream is not None else None
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="diffserve-stages", initializer=initializer)
                      if overlap else None)

    @property
    def overlapped(self) -> bool:
        return self._pool is not None

    def submit(self, kind: str, request_id: str, job: Callable[[], Any]) -> None:
        """Run `job()` now (inline) or on the background thread; its result comes out of `collect`."""
        self.pending.add(request_id)
        if self._pool is None:
            self._done.put(self._run(kind, request_id, job, None))
            return
        after = None
        if self._stream is not None:
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        self._pool.submit(lambda: self._done.put(self._run(kind, request_id, job, after)))

    def _run(self, kind: str, request_id: str, job: Callable[[], Any], after) -> StageResult:
        result = StageResult(kind, request_id)
        try:
            if self._stream is None:
                result.value = job()
                return result
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(after)
                try:
                    result.value = job()
                finally:
                    if kind == "finish":
                        self._stream.synchronize()
                if kind == "begin":
                    result.ready = torch.cuda.Event()
                    result.ready.record(self._stream)
        except Exception as exc:  # answered as that request's error; the others go on
            result.error = _portable(exc)
        return result

    def collect(self, wait: bool = False) -> list[StageResult]:
        """The results finished since the last call, in completion order; `wait`: block until there is
        one (when something is pending)."""
        results = []
        if wait and self.pending:
            results.append(self._done.get())
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                break
        for result in results:
            self.pending.discard(result.request_id)
        return results

    def hand_over(self, result: StageResult, obj: Any) -> None:
        """Make `obj` (a begun request's state), made by `result`'s job, safe to use on the step
        thread's stream (see the module docstring)."""
        if result.ready is None:
            return
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(result.ready)
        for tensor in tensors_in(obj):
            if tensor.device.type == "cuda":
                tensor.record_stream(stream)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def tensors_in(obj: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """The tensors `obj` holds: through containers, objects' attributes (a scheduler's sigmas) and the
    closures of functions (a pipeline's step_inputs); not modules' weights, which live as long as the
    worker."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (nn.Module, type, str, bytes, int, float, bool)) or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif isinstance(obj, types.FunctionType):
        children = [cell.cell_contents for cell in obj.__closure__ or () if _filled(cell)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, (types.MethodType, types.ModuleType)):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from tensors_in(child, seen)


def _portable(exc: Exception) -> Exception:
    """`exc`, or a RuntimeError naming it where it would not survive the way to the engine process
    (a worker in a process of its own sends its results pickled)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True
