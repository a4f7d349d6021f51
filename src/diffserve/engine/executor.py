"""Executors run a scheduled request on every worker and return rank 0's output.

With world size 1 the worker lives in this process. Multi-process execution (one worker per GPU)
is the multi-GPU runtime's executor and plugs in behind the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.worker import DiffusionWorker
from diffserve.request import DiffusionOutput, OmniDiffusionRequest


class Executor(ABC):
    @abstractmethod
    def execute(self, req: OmniDiffusionRequest) -> DiffusionOutput: ...

    @abstractmethod
    def start_profile(self, trace_dir: str) -> None: ...

    @abstractmethod
    def stop_profile(self) -> list[str]: ...

    @abstractmethod
    def is_healthy(self) -> bool: ...

    @abstractmethod
    def shutdown(self) -> None: ...


class InProcessExecutor(Executor):
    def __init__(self, od_config: OmniDiffusionConfig):
        self.worker: DiffusionWorker | None = DiffusionWorker(od_config)

    def _live_worker(self) -> DiffusionWorker:
        if self.worker is None:
            raise RuntimeError("the engine has been shut down")
        return self.worker

    def execute(self, req: OmniDiffusionRequest) -> DiffusionOutput:
        return self._live_worker().execute(req)

    def start_profile(self, trace_dir: str) -> None:
        self._live_worker().start_profile(trace_dir)

    def stop_profile(self) -> list[str]:
        return [self._live_worker().stop_profile()]

    def is_healthy(self) -> bool:
        return self.worker is not None

    def shutdown(self) -> None:
        self.worker = None


def make_executor(od_config: OmniDiffusionConfig) -> Executor:
    world_size = od_config.parallel_config.world_size
    if world_size == 1:
        return InProcessExecutor(od_config)
    raise ValueError(
        f"a parallel config with world size {world_size} needs the multi-process executor, which this "
        f"version does not have yet; use the default single-process settings"
    )
