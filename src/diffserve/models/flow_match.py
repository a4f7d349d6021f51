"""Timestep schedules for flow-matching pipelines (FLUX, SD3, Qwen-Image, Wan)."""

from __future__ import annotations

import inspect

import numpy as np
import torch


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent timestep shift `mu`: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def shift_from_scheduler_config(scheduler, image_seq_len: int) -> float:
    config = scheduler.config
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def default_sigmas(num_inference_steps: int) -> np.ndarray:
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def set_timesteps(
    scheduler,
    num_inference_steps: int,
    device: torch.device,
    sigmas: list[float] | np.ndarray | None = None,
    **kwargs,
) -> torch.Tensor:
    """Configure `scheduler` for a run and return its timesteps on `device`."""
    if sigmas is not None and "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"{type(scheduler).__name__} does not accept custom sigmas")
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    # Fixing the begin index keeps scheduler.step from searching the schedule (a host sync) each step.
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler.timesteps
