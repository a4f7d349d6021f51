"""Timestep and conditioning embedders shared by DiT models."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.layers.linear import ReplicatedLinear

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] (float32) of N possibly fractional timesteps."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])  # in diffusers' order: bit-equal to it
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class TwoLayerMLP(nn.Module):
    """linear_1 -> activation -> linear_2, the shape of every timestep / text / guidance embedder."""

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int | None = None, act: str = "silu", bias: bool = True
    ):
        super().__init__()
        self.linear_1 = ReplicatedLinear(in_dim, hidden_dim, bias=bias)
        self.act = get_activation(act)
        self.linear_2 = ReplicatedLinear(hidden_dim, out_dim or hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """The conditioning vector of MMDiTs (FLUX, SD3): embedded timestep (+ distilled guidance, FLUX.1-dev)
    + embedded pooled text embedding, with timestep and guidance on the 1000-step scale both models
    were trained with."""

    def __init__(self, dim: int, pooled_projection_dim: int, guidance_embeds: bool = False):
        super().__init__()
        self.timestep_embedder = TwoLayerMLP(256, dim)
        self.guidance_embedder = TwoLayerMLP(256, dim) if guidance_embeds else None
        self.text_embedder = TwoLayerMLP(pooled_projection_dim, dim)

    def forward(
        self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled_projection: torch.Tensor
    ) -> torch.Tensor:
        dtype = pooled_projection.dtype
        emb = self.timestep_embedder(timestep_embedding(timestep, 256).to(dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, 256).to(dtype))
        return emb + self.text_embedder(pooled_projection)
