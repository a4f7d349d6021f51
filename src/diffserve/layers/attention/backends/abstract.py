from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class AttentionBackend(ABC):
    """Computes softmax(q k^T * scale) v on [B, S, H, D] tensors and returns [B, S_q, H, D]."""

    name: ClassVar[str]
    supports_mask: ClassVar[bool] = False

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
