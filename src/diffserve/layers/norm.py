"""Normalization layers shared by every model."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.loader.weight_utils import default_weight_loader, set_weight_attrs


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
