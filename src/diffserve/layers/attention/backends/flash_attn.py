from __future__ import annotations

import importlib.util

from diffserve.layers.attention.backends.abstract import AttentionBackend, needs_cuda_16bit


def _flash_attn_func():
    # FlashAttention-3 (Hopper) first, then FlashAttention-2.
    if importlib.util.find_spec("flash_attn_interface") is not None:
        from flash_attn_interface import flash_attn_func

        return flash_attn_func
    from flash_attn import flash_attn_func

    return flash_attn_func


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    supports_mask = False

    @classmethod
    def unavailable_reason(cls, device, dtype):
        if reason := needs_cuda_16bit(device, dtype):
            return reason
        if not any(importlib.util.find_spec(m) for m in ("flash_attn_interface", "flash_attn")):
            return "neither flash_attn_interface (FA3) nor flash_attn (FA2) is installed"
        return None

    @staticmethod
    def forward(query, key, value, attn_mask, scale, causal):
        out = _flash_attn_func()(query, key, value, softmax_scale=scale, causal=causal)
        return out[0] if isinstance(out, tuple) else out
