"""Feed-forward blocks: column-parallel up projection, activation (or gate), row-parallel down projection.

Chunking (`chunk_size`, set on a whole model by `set_ffn_chunk_size`; the engine's `ffn_chunk_size`):
the feed-forward acts on each token alone, so a long sequence can go through it `chunk_size` tokens at
a time, each chunk's output written into one output tensor. The hidden activation (4x or more the
width of the input) then exists for one chunk at a time instead of for the whole sequence, which is
what bounds the memory of a long sequence (a video). Values are the same up to matmul rounding (a
kernel may pick another reduction order for fewer rows); under TP each chunk is reduced on its own,
still the same sums.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffserve.layers.embeddings import get_activation
from diffserve.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear


class ChunkedFeedForward(nn.Module):
    """A per-token feed-forward whose `forward` runs `chunk_size` tokens at a time when set."""

    # Tokens per chunk along the token dim (-2); None: the whole sequence at once.
    chunk_size: int | None = None

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.chunk_size
        if size is None or x.dim() < 2 or x.shape[-2] <= size:
            return self.feed_forward(x)
        parts = x.split(size, dim=-2)
        first = self.feed_forward(parts[0])
        out = first.new_empty(*first.shape[:-2], x.shape[-2], first.shape[-1])
        out[..., :size, :] = first
        del first
        for i, part in enumerate(parts[1:], start=1):
            out[..., i * size : i * size + part.shape[-2], :] = self.feed_forward(part)
        return out


class FeedForward(ChunkedFeedForward):
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
        self.act_name = act
        self.proj_out = RowParallelLinear(hidden_dim, dim_out or dim, bias=bias, prefix=f"{prefix}.proj_out")

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_name == "gelu_tanh":
            return self.proj_out(self.proj_in.forward_gelu_tanh(x))
        return self.proj_out(self.act(self.proj_in(x)))


class GatedFeedForward(ChunkedFeedForward):
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

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * self.act(gate))


def set_ffn_chunk_size(model: nn.Module, chunk_size: int | None) -> int:
    """Run every feed-forward under `model` `chunk_size` tokens at a time (None: whole sequences);
    returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, ChunkedFeedForward):
            module.chunk_size = chunk_size
            count += 1
    return count
