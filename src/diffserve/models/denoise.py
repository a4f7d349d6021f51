"""The denoise loop every pipeline runs: per step, predict the noise (with CFG when there is a
negative branch) and step the scheduler, with the progress bar and step callback. Pipelines call it;
none writes its own loop. Nothing here syncs the host.

The loop is built from one step function, `denoise_step`, which advances any number of requests
(`DenoiseState`s: each its own latents, timesteps, step index, scheduler and transformer inputs) by
one step in one transformer call. A request run alone is the group of one; step-level batching
(diffserve.engine.step_batching) steps groups of running requests with the same function.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

StepInputs = Callable[[torch.Tensor, torch.Tensor, int], dict[str, Any]]


def flow_step_inputs(latents: torch.Tensor, t: torch.Tensor, index: int) -> dict[str, Any]:
    """The per-step transformer inputs of flow-matching DiTs: the latents and the timestep in [0, 1]."""
    return {"hidden_states": latents, "timestep": t.expand(latents.shape[0]).to(latents.dtype) / 1000}


@dataclass(eq=False)
class DenoiseState:
    """One request's denoising: what `denoise_step` reads and advances.

    `positive`/`negative` are the transformer inputs fixed for the whole request (negative None: no
    CFG); `step_inputs(latents, t, i)` adds those that change per step. `guidance_scales` holds one
    CFG scale per step. `scheduler` steps the latents; its step index is this request's own.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    positive: dict[str, Any]
    negative: dict[str, Any] | None
    guidance_scales: list[float]
    scheduler: Any
    step_inputs: StepInputs = flow_step_inputs
    index: int = 0

    @classmethod
    def build(cls, pipeline, latents, timesteps, positive, negative, guidance_scale: float | Sequence[float],
              step_inputs: StepInputs = flow_step_inputs) -> "DenoiseState":
        """`guidance_scale` is one value or one per step (e.g. Wan2.2's two experts); the state steps
        `pipeline.scheduler`, already set to `timesteps`."""
        if isinstance(guidance_scale, (list, tuple)):
            scales = list(guidance_scale)
        else:
            scales = [guidance_scale] * len(timesteps)
        return cls(latents, timesteps, positive, negative, scales, pipeline.scheduler, step_inputs)

    @property
    def do_cfg(self) -> bool:
        return self.negative is not None

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)


def _stack_inputs(pipeline, per_request: list[dict[str, Any]]) -> dict[str, Any]:
    """The requests' transformer inputs as one batch: the inputs with a batch dimension (the pipeline's
    `cfg_batched_inputs`) are concatenated; the others depend only on the batch key (position ids), so
    the first request's are every request's."""
    if len(per_request) == 1:
        return per_request[0]
    first = per_request[0]
    return {
        key: torch.cat([inputs[key] for inputs in per_request])
        if key in pipeline.cfg_batched_inputs and isinstance(value, torch.Tensor) else value
        for key, value in first.items()
    }


def batch_rows(states: list[DenoiseState]) -> list[torch.Tensor]:
    """Each state's rows in the transformer batch `denoise_step` builds: its samples among all states'
    positive inputs, then (CFG, both branches batched) among their negative inputs."""
    total = sum(s.num_samples for s in states)
    bounds = list(itertools.accumulate((s.num_samples for s in states), initial=0))
    device = states[0].latents.device
    rows = [torch.arange(a, b, device=device) for a, b in zip(bounds, bounds[1:])]
    return [torch.cat([r, r + total]) for r in rows] if states[0].do_cfg else rows


def denoise_step(pipeline, states: list[DenoiseState]) -> None:
    """Advance every state by one step with one transformer call (two without batched CFG branches).

    The states must share a batch key (shapes, CFG on or off, text length; see
    diffserve.engine.step_batching); each has its own timestep, so the timestep input is per sample.
    """
    do_cfg = states[0].do_cfg
    steps = [(s.timesteps[s.index], s.step_inputs(s.latents, s.timesteps[s.index], s.index)) for s in states]
    positive = _stack_inputs(pipeline, [{**s.positive, **inputs} for s, (_, inputs) in zip(states, steps)])
    negative = (
        _stack_inputs(pipeline, [{**s.negative, **inputs} for s, (_, inputs) in zip(states, steps)])
        if do_cfg else None
    )
    if len(states) == 1:
        state = states[0]
        noise_preds = [pipeline.predict_noise_maybe_with_cfg(do_cfg, state.guidance_scales[state.index],
                                                             positive, negative)]
    else:
        noise_preds = _grouped_predictions(pipeline, states, positive, negative)
    for state, (t, _), noise_pred in zip(states, steps, noise_preds):
        state.latents = state.scheduler.step(noise_pred, t, state.latents, return_dict=False)[0]
        state.index += 1


def _grouped_predictions(pipeline, states: list[DenoiseState], positive, negative) -> list[torch.Tensor]:
    """Each state's noise prediction from one batched call; CFG combines each request's branches with
    its own scale (elementwise, so a request's slice is what it gets alone)."""
    bounds = list(itertools.accumulate((s.num_samples for s in states), initial=0))
    if negative is None:
        pred = pipeline.predict_noise(**positive)
        return [pred[a:b] for a, b in zip(bounds, bounds[1:])]
    pos, neg = pipeline.predict_cfg_branches(positive, negative)
    return [
        pipeline.combine_cfg_noise(pos[a:b], neg[a:b], s.guidance_scales[s.index])
        for s, a, b in zip(states, bounds, bounds[1:])
    ]


def run_to_end(pipeline, state: DenoiseState) -> torch.Tensor:
    """Run a state's remaining steps alone, with the progress bar and step callback; its final latents."""
    with pipeline.progress_bar(total=len(state.timesteps)) as progress:
        while not state.done:
            denoise_step(pipeline, [state])
            progress.update()
    return state.latents


def denoise(
    pipeline,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    positive_kwargs: dict[str, Any],
    negative_kwargs: dict[str, Any] | None,
    guidance_scale: float | Sequence[float],
    step_inputs: StepInputs = flow_step_inputs,
) -> torch.Tensor:
    """Run `timesteps` on `pipeline` (a CFGParallelMixin + ProgressBarMixin); see DenoiseState.build."""
    state = DenoiseState.build(pipeline, latents, timesteps, positive_kwargs, negative_kwargs, guidance_scale,
                               step_inputs)
    return run_to_end(pipeline, state)
