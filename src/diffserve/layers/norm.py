"""Normalization layers shared by every model."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.distributed.parallel_state import get_tp_group
from diffserve.loader.weight_utils import WeightLoadingError, check_shape, default_weight_loader, set_weight_attrs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
            set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm over the last dim; without affine parameters it holds no weights at all."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, bias: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
            set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})
            if bias:
                self.bias = nn.Parameter(torch.empty(dim), requires_grad=False)
                set_weight_attrs(self.bias, {"weight_loader": default_weight_loader})
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"


class FP32LayerNorm(LayerNorm):
    """LayerNorm computed in float32 whatever the input and parameter dtypes; the result is cast back
    to the input dtype. Models whose residual stream is modulated in fp32 (Wan) need the normalized
    values at full precision, and bf16 weights must not force a bf16 reduction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (self.dim,), weight, bias, self.eps).to(x.dtype)


class ColumnParallelRMSNorm(nn.Module):
    """RMSNorm over features that a column-parallel layer has split across TP ranks (e.g. q/k norms
    taken across all heads, while each rank holds only its share of the heads).

    Each rank keeps its slice of the weight; the mean square is summed over every rank's slice, so
    the result equals RMSNorm over the full feature dim. At tp=1 it is exactly `F.rms_norm`.
    """

    def __init__(self, dim: int, eps: float = 1e-6, prefix: str = ""):
        super().__init__()
        self.tp_group = get_tp_group()
        self.tp_size = self.tp_group.world_size
        self.tp_rank = self.tp_group.rank_in_group
        if dim % self.tp_size:
            raise ValueError(
                f"{prefix or 'RMSNorm'} dim ({dim}) is not divisible by the tensor parallel size ({self.tp_size})"
            )
        self.dim = dim
        self.local_dim = dim // self.tp_size
        self.eps = eps
        self.prefix = prefix
        self.weight = nn.Parameter(torch.empty(self.local_dim), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.dim:
            raise WeightLoadingError(
                f"{self.prefix or 'column-parallel RMSNorm'}: checkpoint tensor has {loaded.shape[0]} features, "
                f"expected {self.dim}"
            )
        shard = loaded.narrow(0, self.tp_rank * self.local_dim, self.local_dim)
        check_shape(param, shard)
        param.data.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        sum_sq = self.tp_group.all_reduce(x.float().pow(2).sum(-1, keepdim=True))
        normed = x.float() * torch.rsqrt(sum_sq / self.dim + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, tp={self.tp_size}"
