"""Executors run a scheduled request on every worker and return rank 0's output.

- world size 1: the worker lives in this process (InProcessExecutor);
- world size > 1: one spawned worker process per rank of the replica (MultiprocExecutor); with
  data_parallel_size > 1, one executor per replica, each on its own devices and rendezvous port;
- launched by torchrun (multi-node): this process is one rank and every rank runs the same script
  (TorchrunExecutor).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

from diffserve.config import ENV_TORCHRUN, OmniDiffusionConfig
from diffserve.distributed import parallel_state as ps
from diffserve.engine.worker import DiffusionWorker, init_parallel_state
from diffserve.request import DiffusionOutput, OmniDiffusionRequest


class Executor(ABC):
    @abstractmethod
    def execute(
        self, req: OmniDiffusionRequest, progress: Callable[[int, int], None] | None = None
    ) -> DiffusionOutput:
        """Run `req` on every rank; rank 0's output. `progress(done, total)` follows the denoise steps."""

    @abstractmethod
    def request_abort(self) -> None:
        """Stop the running request at its next step (thread-safe; a no-op when nothing runs)."""

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call `DiffusionWorker.<method>(*args)` on every rank; the results, by rank."""

    @abstractmethod
    def start_profile(self, trace_dir: str) -> None: ...

    @abstractmethod
    def stop_profile(self) -> list[str]: ...

    @abstractmethod
    def is_healthy(self) -> bool: ...

    def kill(self) -> bool:
        """Kill wedged worker processes so a blocked call fails; False if there are none to kill
        (the worker runs in this process)."""
        return False

    @abstractmethod
    def shutdown(self) -> None: ...


class InProcessExecutor(Executor):
    def __init__(self, od_config: OmniDiffusionConfig):
        self.worker: DiffusionWorker | None = DiffusionWorker(od_config)

    def _live_worker(self) -> DiffusionWorker:
        if self.worker is None:
            raise RuntimeError("the engine has been shut down")
        return self.worker

    def execute(self, req, progress=None) -> DiffusionOutput:
        worker = self._live_worker()
        worker.abort_flag.value = 0
        return worker.execute(req, progress)

    def request_abort(self) -> None:
        if self.worker is not None:
            self.worker.abort_flag.value = 1

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self._live_worker(), method)(*args)]

    def start_profile(self, trace_dir: str) -> None:
        self._live_worker().start_profile(trace_dir)

    def stop_profile(self) -> list[str]:
        return [self._live_worker().stop_profile()]

    def is_healthy(self) -> bool:
        return self.worker is not None

    def shutdown(self) -> None:
        self.worker = None


class TorchrunExecutor(InProcessExecutor):
    """This process is one rank of a torchrun launch; every rank calls generate() with the same inputs.

    Rank 0's request is broadcast first, so ranks agree even on seeds drawn at random. Only rank 0's
    outputs are post-processed into images.
    """

    def __init__(self, od_config: OmniDiffusionConfig, rank: int, world_size: int, local_rank: int):
        init_parallel_state(od_config, rank, world_size, local_rank)
        self.worker = DiffusionWorker(od_config, rank=rank, local_rank=local_rank)

    def execute(self, req, progress=None) -> DiffusionOutput:
        synced = ps.get_world_group().broadcast_object(req)
        # Report what ran: the prompts here are shared with the caller's requests.
        for mine, theirs in zip(req.prompts, synced.prompts):
            mine.seed = theirs.seed
        worker = self._live_worker()
        worker.abort_flag.value = 0
        return worker.execute(synced, progress)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.worker = None


def make_executor(od_config: OmniDiffusionConfig, replica: int = 0) -> Executor:
    """The executor of data-parallel replica `replica` (0 without data parallelism)."""
    pc = od_config.parallel_config
    launched = ENV_TORCHRUN.get("WORLD_SIZE", 1)
    if launched > 1:
        if pc.data_parallel_size > 1:
            raise ValueError(
                f"data_parallel_size={pc.data_parallel_size} cannot run under torchrun (every torchrun rank "
                "runs the same requests); start one torchrun job per replica behind a router, or use "
                "diffserve.integrations.ray_serve"
            )
        if launched != pc.world_size:
            raise ValueError(
                f"torchrun started {launched} processes but the parallel config needs {pc.world_size} "
                f"(tp x ulysses x ring x cfg)"
            )
        return TorchrunExecutor(od_config, ENV_TORCHRUN["RANK"], launched, ENV_TORCHRUN.get("LOCAL_RANK", 0))
    # With several replicas each runs in its own processes, even with one rank: a replica that dies
    # then takes only its own requests down, and replicas do not share this process's interpreter.
    if pc.world_size == 1:
        return InProcessExecutor(od_config)
    from diffserve.engine.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor(od_config, replica=replica)
