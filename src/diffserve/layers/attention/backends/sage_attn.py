from __future__ import annotations

import importlib.util

import torch

from diffserve.layers.attention.backends.abstract import AttentionBackend


class SageAttnBackend(AttentionBackend):
    """SageAttention (quantized QK^T); lossy, so it is opt-in only."""

    name = "sage_attn"
    supports_mask = False

    @classmethod
    def unavailable_reason(cls, device, dtype):
        if device.type != "cuda":
            return f"needs CUDA, device is {device}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"needs float16 or bfloat16, dtype is {dtype}"
        if importlib.util.find_spec("sageattention") is None:
            return "sageattention is not installed"
        return None

    @staticmethod
    def forward(query, key, value, attn_mask, scale, causal):
        from sageattention import sageattn

        return sageattn(query, key, value, tensor_layout="NHD", is_causal=causal, sm_scale=scale)
