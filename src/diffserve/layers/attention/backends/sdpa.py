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


def _key_bias(key_mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, S_kv] bool key mask -> additive bias [B, H, S_q, S_kv] (0 or -inf, q's dtype), a broadcast
    view of a row whose storage is padded to a multiple of 16 elements, the alignment the
    memory-efficient kernel requires of its bias."""
    batch, length = key_mask.shape
    storage = torch.full((batch, 1, 1, -(-length // 16) * 16), float("-inf"), dtype=q.dtype, device=q.device)
    bias = storage[..., :length]
    bias.masked_fill_(key_mask[:, None, None, :], 0.0)
    return bias.expand(batch, q.shape[1], q.shape[2], length)


def _masked_attention_with_lse(q, k, v, scale, key_mask):
    """[B, H, S, D] inputs and a [B, S_kv] key mask -> (out, lse [B, H, S_q]); fully masked rows give
    out 0 and lse -inf whatever the kernel does with them."""
    bias = _key_bias(key_mask, q)
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]  # padded to a multiple of the kernel's block
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    else:
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale + bias.float()
        lse = scores.logsumexp(dim=-1)
        out = (torch.softmax(scores, dim=-1).nan_to_num() @ v.float()).to(q.dtype)
    empty = ~key_mask.any(dim=1)  # [B]
    out = out.masked_fill(empty[:, None, None, None], 0.0)
    lse = lse.float().masked_fill(empty[:, None, None], float("-inf"))
    return out, lse


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
    def forward_with_lse(query, key, value, scale, key_mask=None):
        # The public SDPA hides the LSE; the kernels behind it return it.
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        if key_mask is not None:
            out, lse = _masked_attention_with_lse(q, k, v, scale, key_mask)
            return out.transpose(1, 2), lse
        if q.device.type == "cuda":
            out, lse = _cuda_attention_with_lse(q, k, v, scale)
        elif q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        else:
            scores = (q.float() @ k.float().transpose(-1, -2)) * scale
            lse = scores.logsumexp(dim=-1)
            out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
        return out.transpose(1, 2), lse.float()
