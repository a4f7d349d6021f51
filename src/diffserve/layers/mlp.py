"""Feed-forward blocks: column-parallel up projection, activation (or gate), row-parallel down projection."""

from __future__ import annotations

import torch
import torch.nn as nn

from diffserve.layers.embeddings import get_activation
from diffserve.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear


class FeedForward(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        dim_out: int | None = None,
        act: str = "gelu_tanh",
        bias: bool = True,
        prefix: str = "",
    ):
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        self.proj_in = ColumnParallelLinear(dim, hidden_dim, bias=bias, prefix=f"{prefix}.proj_in")
        self.act = get_activation(act)
        self.proj_out = RowParallelLinear(hidden_dim, dim_out or dim, bias=bias, prefix=f"{prefix}.proj_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.act(self.proj_in(x)))


class GatedFeedForward(nn.Module):
    """Gated-linear-unit feed-forward (SwiGLU with act="silu", GEGLU with "gelu"): one up projection
    yields a value half and a gate half, the block returns proj_out(value * act(gate)).

    The up projection is a merged column-parallel layer of two equal blocks, so under TP each rank
    holds matching slices of value and gate and the split stays local. Checkpoints store it as one
    [2 * hidden_dim, dim] tensor, value rows first, which the merged layer's loader splits.
    """

    def __init__(self, dim: int, hidden_dim: int, dim_out: int | None = None, act: str = "silu", bias: bool = True):
        super().__init__()
        self.proj_in = MergedColumnParallelLinear(dim, [hidden_dim, hidden_dim], bias=bias)
        self.act = get_activation(act)
        self.proj_out = RowParallelLinear(hidden_dim, dim_out or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * self.act(gate))
