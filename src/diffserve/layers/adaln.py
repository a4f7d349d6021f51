"""Adaptive layer norm (adaLN) modulation shared by DiT models.

A conditioning vector (timestep + pooled text) goes through SiLU and one linear layer that yields
shift/scale/gate chunks; the norm output is modulated as x * (1 + scale) + shift. Under TP the
modulation linear is split by output and gathered: these layers are a quarter of FLUX's weights,
while the gathered vector is only [batch, chunks * dim].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.layers.linear import ColumnParallelLinear
from diffserve.layers.norm import LayerNorm


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [B, S, D]; shift, scale: [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNModulation(nn.Module):
    """SiLU -> linear -> `num_chunks` chunks of `dim` each (parameter name `linear`)."""

    def __init__(self, dim: int, num_chunks: int, cond_dim: int | None = None, bias: bool = True):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = ColumnParallelLinear(cond_dim or dim, num_chunks * dim, bias=bias, gather_output=True)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(self.num_chunks, dim=1)


class AdaLayerNormZero(AdaLNModulation):
    """adaLN-Zero for a block with attention and MLP: returns the modulated input and the
    (gate_msa, shift_mlp, scale_mlp, gate_mlp) the block applies later."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(dim, 6, bias=bias)
        self.norm = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = super().forward(emb)
        return modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(AdaLNModulation):
    """adaLN-Zero for a parallel attention+MLP block: (modulated input, gate)."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(dim, 3, bias=bias)
        self.norm = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift, scale, gate = super().forward(emb)
        return modulate(self.norm(x), shift, scale), gate


class AdaLayerNormContinuous(AdaLNModulation):
    """Final-layer adaLN. Its linear emits (scale, shift), in that order, unlike adaLN-Zero."""

    def __init__(self, dim: int, cond_dim: int | None = None, eps: float = 1e-6, bias: bool = True):
        super().__init__(dim, 2, cond_dim=cond_dim, bias=bias)
        self.norm = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb).to(x.dtype)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)
