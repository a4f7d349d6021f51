"""Rotary position embeddings (RoPE) for image, video and text tokens."""

from __future__ import annotations

import torch
import torch.nn as nn


def rope_cos_sin(
    dim: int,
    positions: torch.Tensor,
    theta: float = 10000.0,
    interleaved: bool = True,
    freq_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, dim] (float32) for positions [S].

    By default frequencies are computed in float64 (except on devices without it) because positions
    reach the thousands and float32 phase errors there are visible in bf16 outputs. A model trained
    with float32 tables (Stable Audio) passes `freq_dtype=torch.float32` to get those same tables:
    at position 1000 the two differ by about 3e-5.
    """
    if dim % 2:
        raise ValueError(f"RoPE dimension must be even, got {dim}")
    if freq_dtype is None:
        freq_dtype = torch.float32 if positions.device.type in ("mps", "npu") else torch.float64
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freq_dtype, device=positions.device) / dim))
    angles = torch.outer(positions.to(freq_dtype), inv_freq)  # [S, dim/2]
    cos, sin = angles.cos(), angles.sin()
    if interleaved:  # pairs (x0, x1), (x2, x3), ... share one frequency
        cos, sin = cos.repeat_interleave(2, dim=1), sin.repeat_interleave(2, dim=1)
    else:  # halves (x[:d/2], x[d/2:]) share one frequency
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    return cos.float(), sin.float()


def grid_positions(*sizes: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions [prod(sizes), len(sizes)] of every cell of a grid in row-major order, e.g. (frame,
    row, column) of each video patch token, as float ids for MultiAxisRoPE."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


class MultiAxisRoPE(nn.Module):
    """One RoPE table per position axis (e.g. text/frame, row, column), concatenated along dim."""

    def __init__(
        self,
        theta: float,
        axes_dim: list[int] | tuple[int, ...],
        interleaved: bool = True,
        freq_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)
        self.interleaved = interleaved
        # None: rope_cos_sin's default (float64); torch.float32 for models trained with float32 tables.
        self.freq_dtype = freq_dtype

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [S, n_axes] positions -> (cos, sin), each [S, sum(axes_dim)]."""
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"position ids have {ids.shape[-1]} axes, RoPE expects {len(self.axes_dim)}")
        tables = [
            rope_cos_sin(dim, ids[:, i].float(), self.theta, self.interleaved, self.freq_dtype)
            for i, dim in enumerate(self.axes_dim)
        ]
        return torch.cat([c for c, _ in tables], dim=-1), torch.cat([s for _, s in tables], dim=-1)


def apply_rotary_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """Rotate x [B, S, H, D] by tables cos/sin [S, D]; the math runs in float32."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if interleaved:
        x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
