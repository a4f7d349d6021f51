from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from diffserve.layers.attention.backends.abstract import AttentionBackend


logger = logging.getLogger(__name__)
# cuDNN's attention is the fastest LSE-returning kernel on Hopper (SDPA picks it there too); it
# rejects some shapes, after which the flash kernel is used for the rest of the process.
_cudnn_usable = True


def _flash_supports(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def _cuda_attention_with_lse(q, k, v, scale):
    """[B, H, S, D] inputs -> (out [B, H, S, D], lse [B, H, S])."""
    global _cudnn_usable
    aten = torch.ops.aten
    if _flash_supports(q) and _cudnn_usable:
        try:
            out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
            return out, lse.reshape(q.shape[:3])
        except RuntimeError as error:
            _cudnn_usable = False
            logger.warning("cuDNN attention with LSE unavailable (%s); using the flash kernel", error)
    if _flash_supports(q):
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]  # padded to a multiple of the kernel's block


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
        if q.device.type == "cuda":
            out, lse = _cuda_attention_with_lse(q, k, v, scale)
        elif q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        else:
            scores = (q.float() @ k.float().transpose(-1, -2)) * scale
            lse = scores.logsumexp(dim=-1)
            out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
        return out.transpose(1, 2), lse.float()
