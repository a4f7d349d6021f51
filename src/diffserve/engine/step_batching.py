"""Step-level batching (batching="step"): requests join and leave a running batch between denoise steps.

The worker holds the running requests, each with its own latents, timesteps, step index, scheduler
copy, noise and prompt embeddings (diffserve.models.denoise.DenoiseState); every step runs all of
them in one transformer call with per-sample timesteps. This module decides, at each step boundary,
who runs:

- Running requests share a step key: the request-level batch key (diffserve.engine.admission) without
  the parameters each request keeps to itself (`PER_REQUEST_PARAMS`: its step count and guidance
  scales), so requests with different step counts or scales share steps, while shapes, CFG on/off,
  text length and adapter set still match.
- Between steps, waiting requests with the running key join in arrival order while the batch holds at
  most `max_batch_size` prompts; finished requests leave (decoded at once).
- Fairness: a waiting request whose key differs waits at most `step_max_wait` steps of the running
  batch; then the batch stops admitting and drains, and the next batch starts with that request's key.
  Its wait is bounded by step_max_wait plus the longest remaining step count of the batch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from diffserve.engine.admission import batch_key
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

# Sampling parameters each running request keeps in its own DenoiseState (its timesteps and CFG
# scale), so they are not part of the step key.
PER_REQUEST_PARAMS = frozenset({"num_inference_steps", "guidance_scale", "true_cfg_scale"})


def step_key(spec, req: OmniDiffusionRequest) -> tuple:
    """Requests with equal step keys may run their steps in one transformer call."""
    params, cfg, images = batch_key(spec, req)
    return tuple(p for p in params if p[0] not in PER_REQUEST_PARAMS), cfg, images


def families_with_step_batching() -> list[str]:
    """The native pipeline classes that run under batching="step" (imports every native pipeline)."""
    from diffserve.registry import _DIFFUSION_MODELS, get_pipeline_class

    return [name for name in _DIFFUSION_MODELS if getattr(get_pipeline_class(name), "supports_step_batching", False)]


def check_step_batching(engine) -> None:
    """A model that has not split its call into begin/finish is refused under batching="step"."""
    if not engine.executor.collective_rpc("supports_step_batching")[0]:
        raise ValueError(
            f"batching='step' is not supported by {engine.od_config.model_class_name}; it is by "
            f"{', '.join(families_with_step_batching())} (use batching='request' for this model)"
        )


@dataclass(eq=False)
class _Entry:
    req: OmniDiffusionRequest
    key: tuple
    added_at: float = field(default_factory=time.perf_counter)
    waited_steps: int = 0  # steps run while it waited with a key other than the running one
    occupancy: list[int] = field(default_factory=list)  # samples in each step it ran in

    @property
    def num_prompts(self) -> int:
        return len(self.req.prompts)


class StepBatcher:
    """Drives one engine's worker step by step. `add` queues admitted requests (also between steps),
    `step` runs one step boundary and returns the requests finished by it."""

    def __init__(self, engine):
        self.engine = engine
        self.max_batch_size = engine.od_config.max_batch_size
        self.max_wait = engine.od_config.step_max_wait
        self.waiting: deque[_Entry] = deque()
        self.running: dict[str, _Entry] = {}
        self.key: tuple | None = None  # the running batch's step key
        self.occupancy: list[int] = []  # samples per step, over all steps run

    def add(self, req: OmniDiffusionRequest) -> None:
        """Queue a request admitted by the engine (it joins at a step boundary)."""
        self.waiting.append(_Entry(req, step_key(self.engine.spec, req)))

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self) -> list[DiffusionOutput]:
        """Admit waiting requests, run one step of the running batch, retire the finished ones."""
        outputs = self._admit()
        if not self.running:
            return outputs
        rpc = self.engine.executor.collective_rpc
        try:
            samples, finished = rpc("step_run")[0]
        except Exception as exc:  # the whole batch shared the failed call
            rpc("step_reset")
            failed = [self.engine.error_output(e.req, exc) for e in self.running.values()]
            self.running.clear()
            return outputs + failed
        self.occupancy.append(samples)
        for entry in self.running.values():
            entry.occupancy.append(samples)
        for entry in self.waiting:
            entry.waited_steps += entry.key != self.key
        return outputs + [self._retire(request_id, out) for request_id, out in finished]

    def run_all(self) -> list[DiffusionOutput]:
        outputs = []
        while not self.idle:
            outputs += self.step()
        return outputs

    def _admit(self) -> list[DiffusionOutput]:
        """Start waiting requests that may join now; error outputs of those whose start failed."""
        if not self.running:
            self.key = self._next_key()
        elif self._draining():
            return []
        errors = []
        size = sum(e.num_prompts for e in self.running.values())
        for entry in [e for e in self.waiting if e.key == self.key]:
            if size + entry.num_prompts > self.max_batch_size and self.running:
                break  # arrival order within a key: nobody overtakes a request that does not fit
            self.waiting.remove(entry)
            try:
                self.engine.executor.collective_rpc("step_begin", entry.req.request_id, entry.req)
            except Exception as exc:
                errors.append(self.engine.error_output(entry.req, exc))
                continue
            self.running[entry.req.request_id] = entry
            size += entry.num_prompts
        return errors

    def _next_key(self) -> tuple | None:
        """The key of the request that has waited longest for another key, else the oldest's."""
        if not self.waiting:
            return None
        return max(self.waiting, key=lambda e: e.waited_steps).key  # max keeps the oldest of equals

    def _draining(self) -> bool:
        return any(e.key != self.key and e.waited_steps >= self.max_wait for e in self.waiting)

    def _retire(self, request_id: str, output: DiffusionOutput) -> DiffusionOutput:
        entry = self.running.pop(request_id)
        output.request_id = request_id
        output.prompt = entry.req.prompts[0].prompt if len(entry.req.prompts) == 1 else None
        output.seed = entry.req.prompts[0].seed if len(entry.req.prompts) == 1 else None
        output.metrics["e2e_s"] = time.perf_counter() - entry.added_at
        output.metrics["step_batch_occupancy"] = entry.occupancy
        output.metrics["mean_step_batch_occupancy"] = sum(entry.occupancy) / len(entry.occupancy)
        return output
