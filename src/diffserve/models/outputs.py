"""Seeded initial noise and turning decoded tensors into user outputs, shared by all pipelines."""

from __future__ import annotations

from typing import Callable

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


def vae_latent_statistics(vae, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the latents of a VAE whose config lists them per channel (Wan, Qwen-Image), as
    float32 [1, C, 1, 1, 1] on `device`."""
    config = vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(device, torch.float32)
    std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(device, torch.float32)
    return mean, std


def denormalize_images(images: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> float32 [0, 1]."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 on the CPU, converted on the device first: 4x less to copy."""
    return (images.detach().float() * 255).round().to(torch.uint8).cpu()


def to_output_type(images: torch.Tensor, output_type: str):
    """Float images [N, C, H, W] in [0, 1] -> PIL list, numpy [N, H, W, C] or the tensor itself."""
    if output_type in ("pt", "np"):
        images = images.detach().cpu()
        return images if output_type == "pt" else images.permute(0, 2, 3, 1).float().numpy()
    from PIL import Image

    uint8 = to_uint8(images).permute(0, 2, 3, 1).numpy()
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


def to_video_output_type(videos: torch.Tensor, output_type: str):
    """Float videos [N, C, F, H, W] in [0, 1] -> per output_type:

    - "pil" (the default): a list with one uint8 array [F, H, W, C] per video, ready for encoding;
    - "np": float array [N, F, H, W, C];
    - "pt": float tensor [N, F, C, H, W] (diffusers' video layout for output_type="pt").
    """
    if output_type in ("pt", "np"):
        videos = videos.detach().cpu()
        return videos.permute(0, 2, 1, 3, 4) if output_type == "pt" else videos.permute(0, 2, 3, 4, 1).float().numpy()
    return list(to_uint8(videos).permute(0, 2, 3, 4, 1).numpy())


def video_post_process(output: DiffusionOutput, output_type: str) -> DiffusionOutput:
    """Post-process for video pipelines: `output.output` holds [0, 1] videos (or latents) and the
    result goes to `output.frames`."""
    if output_type == "latent":
        output.frames = output.output
    else:
        output.frames = to_video_output_type(output.output, output_type)
    output.output = None
    return output


def audio_post_process(output: DiffusionOutput, output_type: str) -> DiffusionOutput:
    """Post-process for audio pipelines: `output.output` holds float32 waveforms [N, channels, samples]
    (or latents) and `metrics["sample_rate"]` their rate. `output.audio` gets a float32 tensor
    [N, channels, samples] for output_type "pt", otherwise one float32 numpy array [channels, samples]
    per clip (output_type "pil", the default, and "np")."""
    if "sample_rate" not in output.metrics:
        raise ValueError("an audio pipeline must report its sample rate in DiffusionOutput.metrics['sample_rate']")
    output.sample_rate = output.metrics["sample_rate"]
    audio = output.output
    if output_type == "latent":
        output.audio = audio
    elif output_type == "pt":
        output.audio = audio.detach().float().cpu()
    else:
        output.audio = list(audio.detach().float().cpu().numpy())
    output.output = None
    return output


PostProcess = Callable[[DiffusionOutput, str], DiffusionOutput]
# The post-process a pipeline gets from its modality unless the registry names one of its own.
POST_PROCESS: dict[str, PostProcess] = {
    "image": image_post_process,
    "video": video_post_process,
    "audio": audio_post_process,
}
