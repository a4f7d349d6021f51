"""The engine: admits requests against the model's spec, schedules them into batches, runs them on the
executor, isolates failures."""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.admission import admit, batch_key
from diffserve.engine.cost import CostProfile, describe_request, estimate_seconds, smaller_request_hint
from diffserve.engine.errors import RequestAborted
from diffserve.engine.executor import Executor, make_executor
from diffserve.engine.scheduler import Scheduler, merge_requests, split_output
from diffserve.engine.step_batching import StepBatcher, check_step_batching, step_key
from diffserve.memory import gib
from diffserve.models.spec import SamplingSpec
from diffserve.registry import resolve_model
from diffserve.request import DiffusionOutput, OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput

logger = logging.getLogger(__name__)

# Offline requests estimated above this many seconds of denoising get a warning before they run.
LARGE_REQUEST_S = 60.0


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def replica_builders(od_config: OmniDiffusionConfig) -> list[Callable[[], "DiffusionEngine"]]:
    """One function per data-parallel replica that builds its engine (for AsyncDiffusionEngine, which
    calls each in that replica's runner thread)."""
    return [functools.partial(DiffusionEngine, od_config, replica=replica)
            for replica in range(od_config.parallel_config.data_parallel_size)]


class DiffusionEngine:
    """One worker group (one data-parallel replica: `replica` is its index) and what runs on it."""

    def __init__(self, od_config: OmniDiffusionConfig, executor: Executor | None = None, replica: int = 0):
        resolve_model(od_config)
        self.od_config = od_config
        self.replica = replica
        self.executor = executor or make_executor(od_config, replica)
        # What the loaded model takes: every request is admitted against it before it is queued.
        self.spec: SamplingSpec = self.executor.collective_rpc("sampling_spec")[0]
        self.cost: CostProfile = self.executor.collective_rpc("cost_profile")[0]
        self.load_report = self._load_report()
        if od_config.batching == "step":
            check_step_batching(self)

    def _load_report(self) -> list[dict]:
        """Per rank: load time and peak host memory (also in the server's /metrics)."""
        report = self.executor.collective_rpc("load_report")
        for rank, stats in enumerate(report):
            logger.info("replica %d rank %d loaded in %.1f s; peak host memory %s", self.replica, rank,
                        stats["load_s"], gib(stats["peak_host_bytes"]))
        return report

    def estimate_seconds(self, req: OmniDiffusionRequest) -> float:
        """Rough denoising time of an admitted request on this engine's devices."""
        return estimate_seconds(self.spec, self.cost, req)

    def warn_if_large(self, req: OmniDiffusionRequest) -> None:
        seconds = self.estimate_seconds(req)
        if seconds > LARGE_REQUEST_S:
            logger.warning(
                "this request (%s) is large for this %s: about %s of denoising; %s to make it faster",
                describe_request(self.spec, req), self.cost.device, format_duration(seconds),
                smaller_request_hint(self.spec),
            )

    def admit(self, req: OmniDiffusionRequest) -> OmniDiffusionRequest:
        """`req` resolved against the model's spec (what run_batch takes), or InvalidRequestError."""
        return admit(self.spec, req)

    def make_scheduler(self, max_queue: int | None = None) -> Scheduler:
        key = step_key if self.od_config.batching == "step" else batch_key
        return Scheduler(self.spec, self.od_config.max_batch_size, max_queue, key)

    def generate(self, requests: list[OmniDiffusionRequest]) -> list[DiffusionOutput]:
        """Admit every request (InvalidRequestError before anything runs), then run them in batches of
        compatible ones; one output per request, in order."""
        admitted = [self.admit(req) for req in requests]
        for req in admitted:
            self.warn_if_large(req)
        if self.od_config.batching == "step":
            return self._generate_step_batched(admitted)
        scheduler = self.make_scheduler()
        for req in admitted:
            scheduler.add(req)
        results: dict[str, DiffusionOutput] = {}
        while (batch := scheduler.start_batch()) is not None:
            for out in self.run_batch(batch.requests):
                results[out.request_id] = out
        return [results[req.request_id] for req in requests]

    def _generate_step_batched(self, admitted: list[OmniDiffusionRequest]) -> list[DiffusionOutput]:
        batcher = self.step_batcher()
        for req in admitted:
            batcher.add(req)
        results = {out.request_id: out for out in batcher.run_all()}
        return [results[req.request_id] for req in admitted]

    def step_batcher(self) -> StepBatcher:
        """A driver of this engine's worker step by step (batching="step"); see step_batching."""
        if self.od_config.batching != "step":
            raise ValueError("step_batcher() needs an engine built with batching='step'")
        return StepBatcher(self)

    def run_batch(
        self, batch: list[OmniDiffusionRequest], progress: Callable[[int, int], None] | None = None
    ) -> list[DiffusionOutput]:
        """Run compatible requests as one pipeline call; one output (or error output) per request."""
        start = time.perf_counter()
        if not self.executor.is_healthy():
            dead = RuntimeError("the engine's workers are not running (a worker died or the engine was shut down)")
            return [self.error_output(req, dead) for req in batch]
        try:
            output = self.executor.execute(merge_requests(batch), progress)
        except RequestAborted as exc:
            return [self.error_output(req, exc) for req in batch]
        except Exception as exc:
            if not self.executor.is_healthy():  # nothing to retry on
                return [self.error_output(req, exc) for req in batch]
            if len(batch) > 1:
                # Find the culprit: run each request alone so only the failing one reports an error.
                logger.warning("batch of %d failed (%s); retrying its requests one by one", len(batch), exc)
                return [out for req in batch for out in self.run_batch([req], progress)]
            return [self.error_output(batch[0], exc)]
        outputs = split_output(output, batch)
        for out in outputs:
            out.metrics["e2e_s"] = time.perf_counter() - start
        return outputs

    @staticmethod
    def error_output(req: OmniDiffusionRequest, exc: Exception) -> DiffusionOutput:
        invalid = isinstance(exc, ValueError)
        if isinstance(exc, RequestAborted):
            return DiffusionOutput(request_id=req.request_id, error=str(exc), error_type="aborted")
        if not invalid:
            logger.exception("request %s failed", req.request_id, exc_info=exc)
        return DiffusionOutput(
            request_id=req.request_id,
            prompt=req.prompts[0].prompt if req.prompts else None,
            seed=req.prompts[0].seed if req.prompts else None,
            error=f"{type(exc).__name__}: {exc}" if not invalid else str(exc),
            error_type="invalid_request" if invalid else "internal",
        )

    def start_profile(self, trace_dir: str) -> None:
        self.executor.start_profile(trace_dir)

    def stop_profile(self) -> list[str]:
        return self.executor.stop_profile()

    def is_healthy(self) -> bool:
        return self.executor.is_healthy()

    def describe(self, req: OmniDiffusionRequest) -> str:
        return describe_request(self.spec, req)

    def kill_workers(self) -> bool:
        """Kill the worker processes of a wedged group (the running call then fails); False when the
        workers live in this process and cannot be killed."""
        return self.executor.kill()

    def restart(self) -> None:
        """Tear the worker group down and start it again with the same config (weights reloaded)."""
        try:
            self.executor.shutdown()
        except Exception:
            logger.exception("shutting the failed workers down")
        self.executor = make_executor(self.od_config, self.replica)
        self.load_report = self._load_report()

    def shutdown(self) -> None:
        self.executor.shutdown()


def warm_up(engine: DiffusionEngine, shapes: list[tuple[int, int, int]]) -> None:
    """One short request per shape before serving: compilation (per resolution and batch size) is paid
    here, and its time logged, instead of by the first clients."""
    for height, width, batch in shapes:
        start = time.perf_counter()
        params = OmniDiffusionSamplingParams(height=height, width=width, num_inference_steps=2, seed=0)
        req = engine.admit(OmniDiffusionRequest(
            prompts=[PromptInput(prompt="warm-up", seed=i) for i in range(batch)], sampling_params=params))
        out = engine.run_batch([req])[0]
        if out.error is not None:
            raise ValueError(f"warm-up {width}x{height}:{batch} failed: {out.error}")
        logger.info("warm-up %dx%d, batch %d: %.1f s (compilation included)", width, height, batch,
                    time.perf_counter() - start)
