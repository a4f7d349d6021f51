from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.layers.attention.backends.abstract import AttentionBackend


def _flash_supports(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


class TorchSDPABackend(AttentionBackend):
    """torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math kernels)."""

    name = "sdpa"
    supports_mask = True
    supports_lse = True

    @staticmethod
    def forward(query, key, value, attn_mask, scale, causal):
        # SDPA wants [B, H, S, D]; our layout is [B, S, H, D].
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        return out.transpose(1, 2)

    @staticmethod
    def forward_with_lse(query, key, value, scale):
        # The public SDPA hides the LSE; the kernels behind it return it.
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        aten = torch.ops.aten
        if q.device.type == "cuda" and _flash_supports(q):
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        elif q.device.type == "cuda":
            out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
            lse = lse[..., : q.shape[2]]  # padded to a multiple of the kernel's block
        elif q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        else:
            scores = (q.float() @ k.float().transpose(-1, -2)) * scale
            lse = scores.logsumexp(dim=-1)
            out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
        return out.transpose(1, 2), lse.float()
