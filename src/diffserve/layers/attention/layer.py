"""The attention layer every model uses.

Models hand it q/k/v shaped [B, S, heads, head_dim] (heads may be this rank's share under TP) and
get [B, S, heads, head_dim] back. Which kernel runs is decided from outside, once, by
`set_attention_backend`; sequence parallelism wraps this layer with hooks, so models never see it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from diffserve.layers.attention.backends import AttentionBackend, TorchSDPABackend

logger = logging.getLogger(__name__)


def _expand_mask(attn_mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """A [B, S_kv] key mask (True = attend) becomes SDPA's broadcastable [B, 1, 1, S_kv]."""
    if attn_mask is None or attn_mask.dim() == 4:
        return attn_mask
    if attn_mask.dim() == 2:
        return attn_mask[:, None, None, :]
    raise ValueError(f"attention mask must be [B, S_kv] or [B, H, S_q, S_kv], got shape {tuple(attn_mask.shape)}")


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        softmax_scale: float | None = None,
        causal: bool = False,
        num_kv_heads: int | None = None,
        prefix: str = "",
        skip_sequence_parallel: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads or num_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_size**-0.5
        self.causal = causal
        self.prefix = prefix
        # True when k/v are whole on every sequence-parallel rank (cross-attention to text or image
        # tokens, which are never split): only q is sharded, so the layer needs no SP communication
        # and sequence-parallel wrappers must leave it alone.
        self.skip_sequence_parallel = skip_sequence_parallel
        self.backend: type[AttentionBackend] = TorchSDPABackend
        # Set from outside by sequence parallelism (distributed/sequence_parallel.py): a callable
        # (layer, q, k, v, mask) -> out that wraps `compute` with the sequence exchange.
        self.sequence_parallel = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.sequence_parallel is not None:
            return self.sequence_parallel(self, query, key, value, attn_mask)
        return self.compute(query, key, value, attn_mask)

    def compute(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention itself, on whatever part of the sequence and heads this rank holds."""
        backend = self.backend
        if attn_mask is not None and not backend.supports_mask:
            backend = TorchSDPABackend
        return backend.forward(query, key, value, _expand_mask(attn_mask, query), self.softmax_scale, self.causal)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_size={self.head_size}, backend={self.backend.name}"


def set_attention_backend(model: nn.Module, backend: type[AttentionBackend]) -> int:
    """Point every Attention layer under `model` at `backend`; returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
            count += 1
    return count
