"""How a linear layer computes: the compute method every LinearBase delegates its matmul to.

As in vLLM, quantization lives in the layers, not in models: a method is chosen at load
(`quantize_linear_layers`), converts the layer's (already sharded) weights once, and computes each
forward. Models, TP sharding and fused QKV are unchanged.

- `UnquantizedLinearMethod`: the weight in the model's dtype, F.linear.
- `Fp8LinearMethod`: the weight in float8 e4m3 with one scale per output channel, quantized after
  loading; each forward quantizes the activations per token (dynamic) and runs torch._scaled_mm with
  both scales, accumulating in the activation dtype. Halves the weight bytes and uses the FP8 tensor
  cores of Hopper/Ada GPUs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
QUANTIZATION_METHODS = ("fp8",)


class LinearMethod:
    def process_weights(self, layer: nn.Module) -> None:
        """Convert the loaded weights (once, after loading)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor in float8 e4m3 with its own float32 scale: (q [M, K], scale [M, 1])."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8LinearMethod(LinearMethod):
    def process_weights(self, layer) -> None:
        weight, scale = quantize_fp8_rows(layer.weight.data)  # one scale per output channel
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # [1, out]

    def apply(self, layer, x, bias):
        shape = x.shape
        # cuBLASLt takes a row-major first operand; an activation that arrives as a transposed view
        # (Stable Audio's) would otherwise keep its column-major strides through the quantization.
        x_q, x_scale = quantize_fp8_rows(x.reshape(-1, shape[-1]).contiguous())
        # _scaled_mm wants its second operand column-major: the row-major [out, in] weight, transposed.
        y = torch._scaled_mm(x_q, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale,
                             bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


def check_fp8_supported(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"quantization='fp8' needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
            f"{name} is {major}.{minor}. Run without quantization"
        )


def quantizable(layer: nn.Module) -> bool:
    """Whether the kernel takes the layer: FP8 matmuls need both sides to be multiples of 16."""
    from diffserve.layers.linear import LinearBase

    return isinstance(layer, LinearBase) and layer.weight.shape[0] % 16 == 0 and layer.weight.shape[1] % 16 == 0


def quantized_weight_bytes(module: nn.Module, method: str) -> dict[int, int]:
    """{id(weight): bytes once quantized} for each linear layer of `module` that `method` converts: one
    byte per element and a float32 scale per output channel (works on meta tensors, before loading)."""
    _check_method(method)
    return {id(layer.weight): layer.weight.numel() + 4 * layer.weight.shape[0]
            for layer in module.modules() if quantizable(layer)}


def _check_method(method: str) -> None:
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {method!r}")


def quantize_linear_layers(module: nn.Module, method: str) -> int:
    """Give every linear layer of `module` whose shape the kernel takes the `method` compute method;
    how many were converted. FP8 matmuls need both sides to be multiples of 16; other layers (tiny
    embedders) stay as they are."""
    _check_method(method)
    count = 0
    for layer in module.modules():
        if quantizable(layer):
            layer.quant_method = Fp8LinearMethod()
            layer.quant_method.process_weights(layer)
            count += 1
    return count
