"""Feed-forward block: column-parallel up projection, activation, row-parallel down projection."""

from __future__ import annotations

import torch
import torch.nn as nn

from diffserve.layers.embeddings import get_activation
from diffserve.layers.linear import ColumnParallelLinear, RowParallelLinear


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
