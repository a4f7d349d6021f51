"""The denoise loop every pipeline runs: per step, predict the noise (with CFG when there is a
negative branch) and step the scheduler, with the progress bar and step callback. Pipelines call it;
none writes its own loop. Nothing here syncs the host."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

StepInputs = Callable[[torch.Tensor, torch.Tensor, int], dict[str, Any]]


def flow_step_inputs(latents: torch.Tensor, t: torch.Tensor, index: int) -> dict[str, Any]:
    """The per-step transformer inputs of flow-matching DiTs: the latents and the timestep in [0, 1]."""
    return {"hidden_states": latents, "timestep": t.expand(latents.shape[0]).to(latents.dtype) / 1000}


def denoise(
    pipeline,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    positive_kwargs: dict[str, Any],
    negative_kwargs: dict[str, Any] | None,
    guidance_scale: float | Sequence[float],
    step_inputs: StepInputs = flow_step_inputs,
) -> torch.Tensor:
    """Run `timesteps` on `pipeline` (a CFGParallelMixin + ProgressBarMixin).

    `positive_kwargs`/`negative_kwargs` are the transformer inputs fixed for the whole request;
    `step_inputs(latents, t, i)` adds those that change per step. `guidance_scale` is one value or
    one per step (e.g. Wan2.2's two experts).
    """
    do_cfg = negative_kwargs is not None
    scales = list(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else [guidance_scale] * len(timesteps)
    with pipeline.progress_bar(total=len(timesteps)) as progress:
        for i, t in enumerate(timesteps):
            inputs = step_inputs(latents, t, i)
            noise_pred = pipeline.predict_noise_maybe_with_cfg(
                do_cfg,
                scales[i],
                {**positive_kwargs, **inputs},
                {**negative_kwargs, **inputs} if do_cfg else None,
            )
            latents = pipeline.scheduler_step_maybe_with_cfg(noise_pred, t, latents, do_cfg)
            progress.update()
    return latents
