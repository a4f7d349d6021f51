from __future__ import annotations

import torch.nn.functional as F

from diffserve.layers.attention.backends.abstract import AttentionBackend


class TorchSDPABackend(AttentionBackend):
    """torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math kernels)."""

    name = "sdpa"
    supports_mask = True

    @staticmethod
    def forward(query, key, value, attn_mask, scale, causal):
        # SDPA wants [B, H, S, D]; our layout is [B, S, H, D].
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        return out.transpose(1, 2)
