from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class AttentionBackend(ABC):
    """Computes softmax(q k^T * scale) v on [B, S, H, D] tensors and returns [B, S_q, H, D]."""

    name: ClassVar[str]
    supports_mask: ClassVar[bool] = False
    # Whether forward_with_lse exists (ring attention merges partial results by their LSE).
    supports_lse: ClassVar[bool] = False

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if the backend can run on this device and dtype, else why not."""
        return None

    @staticmethod
    @abstractmethod
    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        causal: bool,
    ) -> torch.Tensor: ...

    @staticmethod
    def forward_with_lse(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-causal attention that also returns the softmax log-sum-exp.

        `key_mask` [B, S_kv] bool (True: attend), only for backends with `supports_mask`. A row whose
        keys are all masked gets output 0 and lse -inf (it adds nothing when partials are merged).
        Returns (out [B, S_q, H, D], lse [B, H, S_q] in float32).
        """
        raise NotImplementedError


def needs_cuda_16bit(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a CUDA half-precision kernel cannot run on `device` in `dtype`, or None."""
    if device.type != "cuda":
        return f"needs CUDA, device is {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, dtype is {dtype}"
    return None
