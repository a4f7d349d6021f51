"""The denoise loop every pipeline runs: per step, predict the noise (with CFG when there is a
negative branch) and step the scheduler, with the progress bar and step callback. Pipelines call it;
none writes its own loop. Nothing here syncs the host.

The loop is built from one step function, `denoise_step`, which advances any number of requests
(`DenoiseState`s: each its own latents, timesteps, step index, scheduler and transformer inputs) by
one step. A request run alone is the group of one; step-level batching
(diffserve.engine.step_batching) steps groups of running requests with the same function.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F

# A request's transformer inputs that change per step, from its state (latents, timestep, index and
# scheduler are the state's own).
StepInputs = Callable[["DenoiseState"], dict[str, Any]]
# Entered around each transformer call of a step with the indices of the states the call runs (step
# caches learn whose rows the batch holds: diffserve.engine.worker).
CallScope = Callable[[list[int]], ContextManager]


def flow_step_inputs(state: "DenoiseState") -> dict[str, Any]:
    """The per-step transformer inputs of flow-matching DiTs: the latents and the timestep in [0, 1]."""
    latents = state.latents
    return {"hidden_states": latents, "timestep": state.timestep.expand(latents.shape[0]).to(latents.dtype) / 1000}


@dataclass(eq=False)
class DenoiseState:
    """One request's denoising: what `denoise_step` reads and advances.

    `positive`/`negative` are the transformer inputs fixed for the whole request (negative None: no
    CFG); `step_inputs(state)` adds those that change per step. `guidance_scales` holds one CFG scale
    per step. `scheduler` steps the latents; its step index is this request's own.
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
    def timestep(self) -> torch.Tensor:
        """The timestep of the step this state runs next."""
        return self.timesteps[self.index]

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)


def denoise_step(pipeline, states: list[DenoiseState], call_scope: CallScope | None = None) -> None:
    """Advance every state by one step, each with its own timestep (a per-sample transformer input).

    The states must share a step key (shapes, CFG on or off, ...; see diffserve.engine.step_batching).
    They run in one transformer call (two without batched CFG branches), except that per-step inputs
    which are not tensors select what the call does (Wan2.2's expert, SD3's skip-layer guidance on
    this step): the states are grouped by them, one call per group, inside `call_scope(group)`.
    """
    if (precision := getattr(pipeline, "step_precision", None)) is not None:
        precision.before_step(states)  # unquantized_steps: which weights the quantized layers use
    step_inputs = [state.step_inputs(state) for state in states]
    noise_preds: list[torch.Tensor | None] = [None] * len(states)
    for group in _call_groups(step_inputs):
        members = [states[i] for i in group]
        with call_scope(group) if call_scope is not None else contextlib.nullcontext():
            preds = _predict(pipeline, members, [step_inputs[i] for i in group])
        for i, pred in zip(group, preds):
            noise_preds[i] = pred
    for state, noise_pred in zip(states, noise_preds):
        state.latents = state.scheduler.step(noise_pred, state.timestep, state.latents, return_dict=False)[0]
        state.index += 1


def _call_groups(step_inputs: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of the states that share a call: equal non-tensor step inputs, first come first."""
    groups: list[tuple[dict[str, Any], list[int]]] = []
    for i, inputs in enumerate(step_inputs):
        selectors = {key: value for key, value in inputs.items() if not isinstance(value, torch.Tensor)}
        for group_selectors, members in groups:
            if group_selectors == selectors:
                members.append(i)
                break
        else:
            groups.append((selectors, [i]))
    return [members for _, members in groups]


def _predict(pipeline, states: list[DenoiseState], step_inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Each state's guided noise prediction, from one call on the states stacked as one batch."""
    step = _stack_step_inputs(states, step_inputs)  # both CFG branches take the same
    positive = {**_stack_inputs(pipeline, [s.positive for s in states]), **step}
    negative = None
    if states[0].do_cfg:
        negative = {**_stack_inputs(pipeline, [s.negative for s in states]), **step}
    return pipeline.predict_guided_noise(
        states[0].do_cfg, [s.guidance_scales[s.index] for s in states], [s.num_samples for s in states],
        positive, negative,
    )


def _stack_step_inputs(states: list[DenoiseState], step_inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-step inputs are each request's own: tensors are concatenated, each first expanded to its
    request's samples (a timestep its samples share is [1]: Stable Audio's); the other values are
    equal within a call group."""
    if len(states) == 1:
        return step_inputs[0]
    return {
        key: torch.cat([x[key].expand(s.num_samples, *value.shape[1:]) for s, x in zip(states, step_inputs)])
        if isinstance(value, torch.Tensor) else value
        for key, value in step_inputs[0].items()
    }


def _stack_inputs(pipeline, per_request: list[dict[str, Any]]) -> dict[str, Any]:
    """The requests' fixed transformer inputs as one batch: the inputs with a batch dimension (the
    pipeline's `cfg_batched_inputs`) are concatenated, text sequences of different lengths first padded
    (`step_padded_inputs`); the others depend only on the step key (position ids), so the first
    request's are every request's."""
    if len(per_request) == 1:
        return per_request[0]
    per_request = _pad_sequences(pipeline, per_request)
    first = per_request[0]
    return {
        key: torch.cat([inputs[key] for inputs in per_request])
        if key in pipeline.cfg_batched_inputs and isinstance(value, torch.Tensor) else value
        for key, value in first.items()
    }


def _pad_sequences(pipeline, per_request: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sequences (dim 1) of different lengths, or some masked, padded with zeros to the longest and
    masked there: attention then ignores the padding, so each request's result is its own."""
    for key, mask_key in pipeline.step_padded_inputs.items():
        sequences = [inputs[key] for inputs in per_request]
        length = max(s.shape[1] for s in sequences)
        if all(s.shape[1] == length and inputs[mask_key] is None for s, inputs in zip(sequences, per_request)):
            continue
        padded = []
        for sequence, inputs in zip(sequences, per_request):
            mask = inputs[mask_key]
            if mask is None:
                mask = torch.ones(sequence.shape[:2], dtype=torch.bool, device=sequence.device)
            pad = length - sequence.shape[1]
            padded.append({**inputs, key: F.pad(sequence, (0, 0, 0, pad)), mask_key: F.pad(mask, (0, pad))})
        per_request = padded
    return per_request


def batch_rows(states: list[DenoiseState]) -> list[torch.Tensor]:
    """Each state's rows in one transformer call of `denoise_step` on these states: its samples among
    all states' positive inputs, then (CFG, both branches batched) among their negative inputs."""
    total = sum(s.num_samples for s in states)
    bounds = list(itertools.accumulate((s.num_samples for s in states), initial=0))
    device = states[0].latents.device
    rows = [torch.arange(a, b, device=device) for a, b in zip(bounds, bounds[1:])]
    return [torch.cat([r, r + total]) for r in rows] if states[0].do_cfg else rows


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
    """Run `timesteps` on `pipeline` (a CFGParallelMixin + ProgressBarMixin); see DenoiseState.build.
    For a pipeline whose `forward` runs a request alone; one that splits its call into begin/finish
    (step-level batching) builds the DenoiseState itself."""
    state = DenoiseState.build(pipeline, latents, timesteps, positive_kwargs, negative_kwargs, guidance_scale,
                               step_inputs)
    return run_to_end(pipeline, state)
