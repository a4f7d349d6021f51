"""GELU (tanh) and per-token FP8 quantization in one pass, for FP8 layers that take a GELU's output.

A feed-forward's hidden activation is 4x the model width: FLUX.1-dev's is [4608, 12288], and its single
blocks feed cat([attention, gelu(mlp)]) ([4608, 15360]) to their output projection. An FP8 layer needs
that input quantized per token, and torch.compile's code for gelu + row max + quantize read each row
twice and evaluated the GELU twice with libdevice's tanh (156 and 191 us per call on an H200). The
Triton kernel here takes the second read from L2 and the tanh from the hardware's approximation.

`GeluTanhInput` is the unevaluated input cat([head, gelu_tanh(tail)], -1) that carries this from one
layer to the next; `quantize_gelu_input_fp8` takes it to (FP8 rows, scales).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below is used
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_BLOCK = 2048  # columns per step of the kernel's loops


class GeluTanhInput(NamedTuple):
    """A linear layer's input cat([head, gelu_tanh(tail)], -1), left unevaluated so that an FP8 layer
    can compute the activation in the pass that quantizes it. Other layers `evaluate()` it."""

    tail: torch.Tensor
    head: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        width = self.tail.shape[-1] + (0 if self.head is None else self.head.shape[-1])
        return torch.Size((*self.tail.shape[:-1], width))

    @property
    def dtype(self) -> torch.dtype:
        return self.tail.dtype

    def evaluate(self) -> torch.Tensor:
        act = F.gelu(self.tail, approximate="tanh")
        return act if self.head is None else torch.cat([self.head, act], dim=-1)


def cat_gelu(head: torch.Tensor, act: torch.Tensor | GeluTanhInput) -> torch.Tensor | GeluTanhInput:
    """cat([head, act], -1), staying unevaluated when `act` is an unevaluated GELU."""
    if isinstance(act, GeluTanhInput):
        return GeluTanhInput(act.tail, head if act.head is None else torch.cat([head, act.head], dim=-1))
    return torch.cat([head, act], dim=-1)


def quantize_gelu_input_fp8_reference(x: GeluTanhInput) -> tuple[torch.Tensor, torch.Tensor]:
    """The arithmetic: the activation in the input's dtype, then one float32 scale per row."""
    rows = x.evaluate().reshape(-1, x.shape[-1])
    scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_gelu_input_fp8(x: GeluTanhInput) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, width] float8 e4m3, scale [M, 1] float32) of the evaluated input's rows: the fused kernel
    on CUDA, the reference elsewhere."""
    if triton is None or not x.tail.is_cuda:
        return quantize_gelu_input_fp8_reference(x)
    tail = x.tail.reshape(-1, x.tail.shape[-1])
    head = None if x.head is None else x.head.reshape(-1, x.head.shape[-1])
    return _gelu_quantize_op(tail.contiguous(), None if head is None else head.contiguous())


@torch.library.custom_op("diffserve::gelu_tanh_quantize_fp8", mutates_args=())
def _gelu_quantize_op(tail: torch.Tensor, head: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, tail_width = tail.shape
    head_width = 0 if head is None else head.shape[1]
    out = torch.empty(rows, head_width + tail_width, dtype=FP8, device=tail.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=tail.device)
    _gelu_quantize_rows[(rows,)](
        tail, tail if head is None else head, out, scale, tail_width, head_width,
        BLOCK=_BLOCK, HAS_HEAD=head is not None, FP8_MAX=FP8_MAX, num_warps=4,
    )
    return out, scale


@_gelu_quantize_op.register_fake
def _(tail, head):
    width = tail.shape[1] + (0 if head is None else head.shape[1])
    return tail.new_empty(tail.shape[0], width, dtype=FP8), tail.new_empty(tail.shape[0], 1, dtype=torch.float32)


if triton is not None:

    @triton.jit
    def _gelu_tanh(t):
        # 0.5 t (1 + tanh(sqrt(2/pi) (t + 0.044715 t^3))), tanh by the hardware's approximation (one
        # instruction; its error, ~2^-11, is below the bf16 rounding that follows).
        u = 0.7978845608028654 * (t + 0.044715 * t * t * t)
        tanh_u = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                           is_pure=True, pack=1)
        return 0.5 * t * (1.0 + tanh_u)

    @triton.jit
    def _gelu_quantize_rows(tail_ptr, head_ptr, out_ptr, scale_ptr, tail_width, head_width,
                            BLOCK: tl.constexpr, HAS_HEAD: tl.constexpr, FP8_MAX: tl.constexpr):
        # Two passes over the row, BLOCK columns at a time: the row max, then the quantized values. The
        # second pass re-reads the row from L2 and recomputes the GELU, which costs less than holding
        # a 12288-wide row in registers (one row per multiprocessor, its loads not overlapped).
        row = tl.program_id(0).to(tl.int64)
        width = head_width + tail_width
        tail_row = tail_ptr + row * tail_width
        head_row = head_ptr + row * head_width
        out_row = out_ptr + row * width
        dtype = tail_ptr.dtype.element_ty
        peak = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, tail_width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            t = tl.load(tail_row + cols, mask=cols < tail_width, other=0.0).to(tl.float32)
            # Rounded to the input's dtype as the unfused layers round it: both paths quantize the same values.
            peak = tl.maximum(peak, tl.abs(_gelu_tanh(t).to(dtype).to(tl.float32)))
        if HAS_HEAD:
            for start in range(0, head_width, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                peak = tl.maximum(peak, tl.abs(tl.load(head_row + cols, mask=cols < head_width, other=0.0).to(tl.float32)))
        amax = tl.maximum(tl.max(peak, axis=0), 1e-12)
        scale = amax / FP8_MAX
        for start in range(0, tail_width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < tail_width
            t = tl.load(tail_row + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.clamp(_gelu_tanh(t).to(dtype).to(tl.float32) / scale, -FP8_MAX, FP8_MAX)
            tl.store(out_row + head_width + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_HEAD:
            for start in range(0, head_width, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < head_width
                h = tl.load(head_row + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_row + cols, tl.clamp(h / scale, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)
