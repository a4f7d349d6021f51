from __future__ import annotations

import importlib.util

from diffserve.layers.attention.backends.abstract import AttentionBackend, needs_cuda_16bit


class SageAttnBackend(AttentionBackend):
    """SageAttention (quantized QK^T); lossy, so it is opt-in only."""

    name = "sage_attn"
    supports_mask = False

    @classmethod
    def unavailable_reason(cls, device, dtype):
        if reason := needs_cuda_16bit(device, dtype):
            return reason
        if importlib.util.find_spec("sageattention") is None:
            return "sageattention is not installed"
        return None

    @staticmethod
    def forward(query, key, value, attn_mask, scale, causal):
        from sageattention import sageattn

        return sageattn(query, key, value, tensor_layout="NHD", is_causal=causal, sm_scale=scale)
