"""FLUX.1 MMDiT: double-stream blocks (separate text and image weights, joint attention) followed by
single-stream blocks (one sequence, attention and MLP in parallel).

Numerically equal to diffusers' FluxTransformer2DModel; weights load from its checkpoints, with q/k/v
fused into one projection per stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from diffserve.distributed.sp_plan import SequenceParallelInput, SequenceParallelOutput
from diffserve.layers.adaln import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle, modulate
from diffserve.layers.attention import Attention
from diffserve.layers.embeddings import TimeTextEmbedding
from diffserve.layers.gelu_fp8 import cat_gelu
from diffserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from diffserve.layers.mlp import FeedForward
from diffserve.layers.norm import LayerNorm, RMSNorm
from diffserve.layers.rope import MultiAxisRoPE, apply_rotary_emb
from diffserve.loader.utils import feed_forward_renames, joint_attention_qkv, load_weights_with_mapping
from diffserve.models.model_config import ModelConfig


@dataclass(frozen=True)
class FluxTransformerConfig(ModelConfig):
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)


class FluxAttention(nn.Module):
    """Joint attention. With `context_dim` set, a second stream (text) has its own q/k/v and output
    projections and attends jointly with the image stream, text tokens first."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, joint: bool, pre_only: bool, eps: float = 1e-6):
        super().__init__()
        self.head_dim = head_dim
        self.to_qkv = QKVParallelLinear(dim, head_dim, num_heads, bias=True)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        if joint:
            self.add_qkv = QKVParallelLinear(dim, head_dim, num_heads, bias=True)
            self.norm_added_q = RMSNorm(head_dim, eps=eps)
            self.norm_added_k = RMSNorm(head_dim, eps=eps)
            self.to_add_out = RowParallelLinear(num_heads * head_dim, dim, bias=True)
        if not pre_only:
            self.to_out = RowParallelLinear(num_heads * head_dim, dim, bias=True)
        self.attn = Attention(self.to_qkv.num_heads, head_dim)

    def _project(self, qkv_proj: QKVParallelLinear, norm_q: RMSNorm, norm_k: RMSNorm, x: torch.Tensor):
        # Unflatten with -1 heads: under TP this rank holds only its share of the heads.
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in qkv_proj.split_qkv(qkv_proj(x)))
        return norm_q(q), norm_k(k), v

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        encoder_hidden_states: torch.Tensor | None = None,
    ):
        q, k, v = self._project(self.to_qkv, self.norm_q, self.norm_k, hidden_states)
        if encoder_hidden_states is not None:
            eq, ek, ev = self._project(self.add_qkv, self.norm_added_q, self.norm_added_k, encoder_hidden_states)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        cos, sin = rotary_emb
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        out = self.attn(q, k, v).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        context_out, image_out = out[:, :text_len], out[:, text_len:]
        return self.to_out(image_out.contiguous()), self.to_add_out(context_out.contiguous())


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # fp16 overflows to inf in the residual stream of the later blocks; bf16/fp32 need no clip.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block: image and text keep their own norms, projections and MLPs."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, num_heads, head_dim, joint=True, pre_only=False)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, 4 * dim, act="gelu_tanh")
        self.norm2_context = LayerNorm(dim, eps=1e-6)
        self.ff_context = FeedForward(dim, 4 * dim, act="gelu_tanh")

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
        attn_out, context_attn_out = self.attn(x, rotary_emb, c)

        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        ff_out = self.ff(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        hidden_states = hidden_states + gate_mlp[:, None] * ff_out

        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
        context_ff_out = self.ff_context(modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp, c_scale_mlp))
        encoder_hidden_states = _clip_fp16(encoder_hidden_states + c_gate_mlp[:, None] * context_ff_out)
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over [text; image]: attention and MLP side by side, one output projection."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        inner = num_heads * head_dim
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = ColumnParallelLinear(dim, mlp_dim, bias=True)
        self.attn = FluxAttention(dim, num_heads, head_dim, joint=False, pre_only=True)
        # Its input is cat([attention, mlp]), two separately column-sharded blocks.
        self.proj_out = RowParallelLinear(inner + mlp_dim, dim, bias=True, input_partition_sizes=[inner, mlp_dim])

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        text_len = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        x, gate = self.norm(residual, temb)
        mlp_out = self.proj_mlp.forward_gelu_tanh(x)
        attn_out = self.attn(x, rotary_emb)
        out = _clip_fp16(residual + gate[:, None] * self.proj_out(cat_gelu(attn_out, mlp_out)))
        return out[:, :text_len], out[:, text_len:]


class FluxTransformer2DModel(nn.Module):
    # Regional compile; HSDP sharding, the step caches' and offload's block lists derive from it.
    _repeated_blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    # Text and image tokens are both split along the sequence; joint attention then sees every token
    # through the sequence-parallel attention, and the output is gathered before the final projection.
    _sp_plan = {
        "": {
            "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3),
            "encoder_hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3),
            "img_ids": SequenceParallelInput(split_dim=0, expected_dims=2),
            "txt_ids": SequenceParallelInput(split_dim=0, expected_dims=2),
        },
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }


    # Step caching (diffserve.cache): the block lists in call order, with their blocks' I/O as
    # cache-dit ForwardPattern names. Both kinds match Pattern_1 exactly: called positionally as
    # block(hidden_states, encoder_hidden_states, temb, rotary_emb) -> (encoder_hidden_states, hidden_states).
    _cache_blocks = {"transformer_blocks": "Pattern_1", "single_transformer_blocks": "Pattern_1"}
    # TeaCache's rescale polynomial (highest power first), fitted on FLUX.1-dev by the TeaCache
    # authors: TeaCache4FLUX/teacache_flux.py in github.com/ali-vilab/TeaCache. schnell shares the
    # architecture; its 1-4 steps leave TeaCache little to skip.
    _teacache_coefficients = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
    # Step-cache defaults where the user sets none. TeaCache: 0.25, the lowest threshold TeaCache4FLUX's
    # README reports (1.5x on FLUX.1-dev, visually lossless in its comparison). Cache-DiT: the built-in
    # DBCache F1B0 (diffserve.cache.CacheDiTConfig), not re-tuned on trained FLUX weights here.
    _cache_defaults = {"tea_cache": {"rel_l1_thresh": 0.25, "warmup_steps": 1}}

    @staticmethod
    def _teacache_modulated_input(block, hidden_states, encoder_hidden_states, temb, rotary_emb):
        """TeaCache's signal, as TeaCache4FLUX reads it: the first double-stream block's
        adaLN-modulated image tokens."""
        return block.norm1(hidden_states, temb)[0]

    # (our fused parameter, diffusers parameter, shard id)
    stacked_params_mapping = joint_attention_qkv()
    # diffusers name fragment -> ours
    weight_renames = [(".attn.to_out.0.", ".attn.to_out."), *feed_forward_renames(".ff.", ".ff_context.")]

    def __init__(self, config: FluxTransformerConfig | None = None, *, od_config=None):
        super().__init__()
        config = config or FluxTransformerConfig()
        self.config = config
        self.out_channels = config.out_channels or config.in_channels
        dim = config.num_attention_heads * config.attention_head_dim
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {config.axes_dims_rope} must sum to attention_head_dim {config.attention_head_dim}"
            )
        self.inner_dim = dim
        self.pos_embed = MultiAxisRoPE(theta=10000, axes_dim=config.axes_dims_rope)
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = ReplicatedLinear(config.joint_attention_dim, dim)
        self.x_embedder = ReplicatedLinear(config.in_channels, dim)
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = ReplicatedLinear(dim, config.patch_size**2 * self.out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, S_img, in_channels] (packed latents), encoder_hidden_states [B, S_txt, D_txt],
        timestep/guidance [B] in [0, 1] -> predicted velocity [B, S_img, out_channels]."""
        if (guidance is None) != (self.time_text_embed.guidance_embedder is None):
            raise ValueError(
                "guidance must be given exactly when the model has a guidance embedding "
                f"(guidance_embeds={self.config.guidance_embeds})"
            )
        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        rotary_emb = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, rotary_emb)
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, rotary_emb)
        return self.proj_out(self.norm_out(hidden_states, temb))

    def load_weights(self, weights) -> set[str]:
        return load_weights_with_mapping(self, weights, self.stacked_params_mapping, self.weight_renames)
