"""Seeded initial noise and turning decoded tensors into user outputs, shared by all pipelines."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from diffserve.request import DiffusionOutput


def seeded_noise(
    seeds: list[int],
    outputs_per_seed: int,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Noise [len(seeds) * outputs_per_seed, *shape], drawn on the CPU, one generator per seed.

    Each seed's block equals diffusers' `randn_tensor((outputs_per_seed, *shape),
    generator=torch.Generator("cpu").manual_seed(seed))`, so a batched request reproduces each
    prompt run alone, on any device.
    """
    blocks = [
        torch.randn((outputs_per_seed, *shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
        for seed in seeds
    ]
    return torch.cat(blocks).to(device)


def denormalize_images(images: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> float32 [0, 1]."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_output_type(images: torch.Tensor, output_type: str):
    """Float images [N, C, H, W] in [0, 1] -> PIL list, numpy [N, H, W, C] or the tensor itself."""
    images = images.detach().cpu()
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    uint8 = (array * 255).round().astype(np.uint8)
    if uint8.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in uint8]
    return [Image.fromarray(a) for a in uint8]


def image_post_process(output: DiffusionOutput, output_type: str) -> DiffusionOutput:
    """Post-process for image pipelines: `output.output` holds [0, 1] images (or latents)."""
    if output_type == "latent":
        output.images = output.output
    else:
        output.images = to_output_type(output.output, output_type)
    output.output = None
    return output


def get_image_post_process_func(od_config) -> Callable[[DiffusionOutput, str], DiffusionOutput]:
    return image_post_process
