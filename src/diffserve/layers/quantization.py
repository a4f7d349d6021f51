"""How a linear layer computes: the compute method every LinearBase delegates its matmul to.

As in vLLM, quantization lives in the layers, not in models: a method is chosen at load
(`quantize_linear_layers`), converts the layer's (already sharded) weights once, and computes each
forward. Models, TP sharding and fused QKV are unchanged.

- `UnquantizedLinearMethod`: the weight in the model's dtype, F.linear.
- `Fp8LinearMethod`: the weight in float8 e4m3 with one scale per output channel, quantized after
  loading; each forward quantizes the activations per token (dynamic) and runs torch._scaled_mm with
  both scales, writing the activation dtype. Halves the weight bytes and uses the FP8 tensor cores of
  Hopper/Ada GPUs. Only the transformer blocks' attention and feed-forward layers convert
  (`converted_layers`). With a `StepPrecision` (the engine's `unquantized_steps`) it keeps the
  original weight too and uses it on the first steps of each request.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.layers.gelu_fp8 import GeluTanhInput, quantize_gelu_input_fp8

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
QUANTIZATION_METHODS = ("fp8",)


class LinearMethod:
    def process_weights(self, layer: nn.Module, device: torch.device | None = None) -> None:
        """Convert the loaded weights (once, after loading), computing on `device` (None: where they are)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def apply(self, layer, x, bias):
        if isinstance(x, GeluTanhInput):
            x = x.evaluate()
        return F.linear(x, layer.weight, bias)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor in float8 e4m3 with its own float32 scale: (q [M, K], scale [M, 1])."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class StepPrecision:
    """Whether the quantized layers compute with their original weights on this step: during the first
    `unquantized_steps` of each request they do (`unquantized_steps`, an engine option). The first steps
    lay out the picture, where FP8's rounding moves it most; later ones refine it. `denoise_step` calls
    `before_step` with the states of the coming transformer call; stepped together (step-level
    batching), requests run unquantized while any of them is in its first steps."""

    def __init__(self, unquantized_steps: int):
        self.unquantized_steps = unquantized_steps
        self.unquantized = False

    def before_step(self, states) -> None:
        self.unquantized = min(state.index for state in states) < self.unquantized_steps


class Fp8LinearMethod(LinearMethod):
    def __init__(self, precision: StepPrecision | None = None):
        # With a StepPrecision the original weight stays beside the FP8 one (`weight_unquantized`).
        self.precision = precision

    def process_weights(self, layer, device=None) -> None:
        # Quantized on the device that computes, also when the weights wait in host memory (offload),
        # so that offload does not change the output: CUDA divides by a scalar as a multiply by its
        # reciprocal, so a scale computed on the host can differ in its last bit.
        home = layer.weight.device
        if self.precision is not None:
            layer.register_buffer("weight_unquantized", layer.weight.data, persistent=False)
        weight, scale = quantize_fp8_rows(layer.weight.data.to(device or home))  # one scale per output channel
        layer.weight = nn.Parameter(weight.to(home), requires_grad=False)
        layer.register_buffer("weight_scale", scale.t().contiguous().to(home), persistent=False)  # [1, out]

    def apply(self, layer, x, bias):
        if self.precision is not None and self.precision.unquantized:
            return F.linear(x.evaluate() if isinstance(x, GeluTanhInput) else x, layer.weight_unquantized, bias)
        shape = x.shape
        if isinstance(x, GeluTanhInput):  # a feed-forward's hidden activation: GELU and quantization in one pass
            x_q, x_scale = quantize_gelu_input_fp8(x)
        else:
            # cuBLASLt takes a row-major first operand; an activation that arrives as a transposed view
            # (Stable Audio's) would otherwise keep its column-major strides through the quantization.
            x_q, x_scale = quantize_fp8_rows(x.reshape(-1, shape[-1]).contiguous())
        # cuBLASLt adds a bias only into a 16-bit output; a float32 model adds its own.
        fused_bias = bias if x.dtype != torch.float32 and bias is not None else None
        # _scaled_mm wants its second operand column-major: the row-major [out, in] weight, transposed.
        # Fast accumulation (Hopper's FP8 tensor cores keep partial sums in fewer bits) is 5% faster on
        # FLUX.1-dev with the same error against bf16 (H200: 98.2 vs 103.8 ms, 7.58e-2 vs 7.56e-2).
        y = torch._scaled_mm(x_q, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale,
                             bias=None if fused_bias is None else fused_bias.to(x.dtype), out_dtype=x.dtype,
                             use_fast_accum=True)
        if bias is not None and fused_bias is None:
            y = y + bias.to(y.dtype)
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


def converted_layers(module: nn.Module) -> list[nn.Module]:
    """The linear layers a method converts: those of the model's repeated blocks (the whole module if it
    declares none), where nearly all the FLOPs are, except the adaLN modulations. The embedders, the
    modulations and the output projection see one token per sample or carry the conditioning into every
    token, so their rounding costs quality and saves almost no time: on the trained demo model (6
    captions vs bf16, CPU) converting every layer drew 25.0 dB worst / 28.4 dB mean, the blocks'
    attention and feed-forward only 29.0 / 33.1. Keeping some of the blocks' layers too buys little
    for what it costs: FP8's rounding error is spread over all of them (on the demo model no block holds
    a quarter of it, no layer a tenth), so no cheap subset lifts the pictures to 35 dB (docs/speed.md,
    "Which layers FP8 converts")."""
    from diffserve.layers.adaln import AdaLNModulation
    from diffserve.models.interface import is_repeated_block

    names = set(getattr(module, "_repeated_blocks", ()))
    blocks = [m for m in module.modules() if is_repeated_block(m, names)] if names else [module]
    kept = {id(layer) for block in blocks for mod in block.modules() if isinstance(mod, AdaLNModulation)
            for layer in mod.modules()}
    return [layer for block in blocks for layer in block.modules() if quantizable(layer) and id(layer) not in kept]


def quantized_weight_bytes(module: nn.Module, method: str, keeps_unquantized: bool = False) -> dict[int, int]:
    """{id(weight): bytes once quantized} for each linear layer of `module` that `method` converts: one
    byte per element and a float32 scale per output channel, plus the original weight when it is kept
    (`unquantized_steps`); works on meta tensors, before loading."""
    _check_method(method)
    sizes = {}
    for layer in converted_layers(module):
        weight = layer.weight
        sizes[id(weight)] = weight.numel() + 4 * weight.shape[0] + keeps_unquantized * weight.nbytes
    return sizes


def _check_method(method: str) -> None:
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {method!r}")


def quantize_linear_layers(module: nn.Module, method: str, device: torch.device | None = None,
                           precision: StepPrecision | None = None) -> int:
    """Give the `converted_layers` of `module` whose shape the kernel takes (FP8 matmuls need both sides
    to be multiples of 16) the `method` compute method, converting their weights on `device` (the one
    that will compute; None: where they are); how many were converted. With `precision`, the layers
    keep their original weights too and use them on the steps it says."""
    _check_method(method)
    layers = converted_layers(module)
    for layer in layers:
        layer.quant_method = Fp8LinearMethod(precision)
        layer.quant_method.process_weights(layer, device)
    return len(layers)
