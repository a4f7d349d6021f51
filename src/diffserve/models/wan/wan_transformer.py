"""Wan2.1 / Wan2.2 video DiT: 3D patch embedding, 3D RoPE, blocks of self-attention, cross-attention
to the text (and, for Wan2.1 image-to-video, to CLIP image tokens) and an MLP, all modulated by the
timestep through a learned shift/scale/gate table.

Numerically equal to diffusers' WanTransformer3DModel; weights load from its checkpoints, with the
self-attention q/k/v fused into one projection and the cross-attention k/v into another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.distributed.sp_plan import SequenceParallelInput, SequenceParallelOutput
from diffserve.layers.attention import Attention
from diffserve.layers.embeddings import TwoLayerMLP, timestep_embedding
from diffserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from diffserve.layers.mlp import FeedForward
from diffserve.layers.norm import ColumnParallelRMSNorm, FP32LayerNorm
from diffserve.layers.rope import MultiAxisRoPE, apply_rotary_emb, grid_positions
from diffserve.loader.utils import feed_forward_renames, fused_kv, fused_qkv, load_weights_with_mapping
from diffserve.models.model_config import ModelConfig

# The only q/k normalization Wan checkpoints use (diffusers builds it whatever the config says).
QK_NORMS = ("rms_norm_across_heads",)


@dataclass(frozen=True)
class WanTransformerConfig(ModelConfig):
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    # Wan2.1 image-to-video: width of the CLIP image tokens, and of the added k/v projections.
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    # Kept for config compatibility: our RoPE tables are computed for the actual positions.
    rope_max_seq_len: int = 1024
    # First-last-frame models: a learned position embedding over the two images' tokens.
    pos_embed_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"Wan transformer qk_norm={self.qk_norm!r} is not supported; supported: {QK_NORMS}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                f"image_dim ({self.image_dim}) and added_kv_proj_dim ({self.added_kv_proj_dim}) must be set together"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# TeaCache for Wan: the coefficients the TeaCache authors fitted on Wan2.1 and publish in
# TeaCache4Wan2.1/teacache_generate.py (github.com/ali-vilab/TeaCache), for their "use_ret_steps"
# variant: the signal is the timestep modulation e0 (what the blocks receive), the first 5 steps always
# run, and the polynomial maps e0's relative L1 change to the model output's. They are per checkpoint:
# T2V 1.3B, T2V 14B, I2V 14B 480P and I2V 14B 720P. A checkpoint's config tells its size and mode (image
# latents concatenated to the noise make in_channels exceed out_channels), not its resolution, so the
# I2V entry is the 480P fit; for Wan2.1-I2V-14B-720P pass WAN21_I2V_720P_TEACACHE_COEFFICIENTS as
# cache_config["coefficients"]. Thresholds: the low (quality) end of the ret-steps settings the
# authors' README lists (1.3B 0.05-0.1, 14B 0.1-0.2, I2V 0.2-0.3), quoted from memory, not re-measured
# here. No coefficients were published for Wan2.2: its A14B experts share the Wan2.1 14B architecture
# and get that size's entry (borrowed, not fitted on Wan2.2); TI2V-5B and first-last-frame checkpoints
# have none and run uncalibrated. Refit either with scripts/fit_teacache_coefficients.py on real weights.
RET_STEPS = 5
WAN_TEACACHE: dict[tuple[str, int], dict] = {
    ("t2v", 1536): {  # Wan2.1-T2V-1.3B
        "coefficients": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
        "rel_l1_thresh": 0.05,
    },
    ("t2v", 5120): {  # Wan2.1-T2V-14B (and Wan2.2-T2V-A14B's experts, borrowed)
        "coefficients": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
        "rel_l1_thresh": 0.1,
    },
    ("i2v", 5120): {  # Wan2.1-I2V-14B-480P (and Wan2.2-I2V-A14B's experts, borrowed)
        "coefficients": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
        "rel_l1_thresh": 0.2,
    },
}
WAN21_I2V_720P_TEACACHE_COEFFICIENTS = (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02)


def wan_teacache_key(config: "WanTransformerConfig") -> tuple[str, int] | None:
    """(mode, width) that selects WAN_TEACACHE's entry; None for first-last-frame checkpoints."""
    if config.pos_embed_seq_len is not None:
        return None
    out_channels = config.out_channels or config.in_channels
    return ("i2v" if config.in_channels > out_channels else "t2v", config.inner_dim)


def rope_axes_dims(head_dim: int) -> list[int]:
    """Per-axis RoPE widths (frame, row, column): rows and columns get 2*(head_dim//6) each, frames the rest."""
    spatial = 2 * (head_dim // 6)
    return [head_dim - 2 * spatial, spatial, spatial]


class WanSelfAttention(nn.Module):
    """Self-attention over the video tokens with q/k RMS-normalized across all heads, then 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        inner = num_heads * head_dim
        self.head_dim = head_dim
        self.to_qkv = QKVParallelLinear(dim, head_dim, num_heads, bias=True)
        self.norm_q = ColumnParallelRMSNorm(inner, eps=eps)
        self.norm_k = ColumnParallelRMSNorm(inner, eps=eps)
        self.to_out = RowParallelLinear(inner, dim, bias=True)
        self.attn = Attention(self.to_qkv.num_heads, head_dim)

    def forward(self, x: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.to_qkv.split_qkv(self.to_qkv(x))
        # Unflatten with -1 heads: under TP this rank holds only its share of the heads.
        q = self.norm_q(q).unflatten(-1, (-1, self.head_dim))
        k = self.norm_k(k).unflatten(-1, (-1, self.head_dim))
        v = v.unflatten(-1, (-1, self.head_dim))
        cos, sin = rotary_emb
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        return self.to_out(self.attn(q, k, v).flatten(2, 3).type_as(q))


class WanCrossAttention(nn.Module):
    """Video tokens attend to the text tokens and, when the model has image conditioning, separately
    to the image tokens; the two results are summed. Keys and values are whole on every
    sequence-parallel rank, so the attention needs no sequence-parallel communication."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float, added_kv_proj_dim: int | None):
        super().__init__()
        inner = num_heads * head_dim
        self.head_dim = head_dim
        self.to_q = ColumnParallelLinear(dim, inner, bias=True)
        self.to_kv = MergedColumnParallelLinear(dim, [inner, inner], bias=True)
        self.norm_q = ColumnParallelRMSNorm(inner, eps=eps)
        self.norm_k = ColumnParallelRMSNorm(inner, eps=eps)
        if added_kv_proj_dim is not None:
            self.add_kv = MergedColumnParallelLinear(added_kv_proj_dim, [inner, inner], bias=True)
            self.norm_added_k = ColumnParallelRMSNorm(inner, eps=eps)
        else:
            self.add_kv = None
        self.to_out = RowParallelLinear(inner, dim, bias=True)
        local_heads = self.to_q.output_size_per_partition // head_dim
        self.attn = Attention(local_heads, head_dim, skip_sequence_parallel=True)

    def _attend(self, q, kv_proj, norm_k, context: torch.Tensor) -> torch.Tensor:
        k, v = kv_proj(context).chunk(2, dim=-1)
        k = norm_k(k).unflatten(-1, (-1, self.head_dim))
        v = v.unflatten(-1, (-1, self.head_dim))
        return self.attn(q, k, v).flatten(2, 3).type_as(q)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_image: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self.norm_q(self.to_q(x)).unflatten(-1, (-1, self.head_dim))
        out = self._attend(q, self.to_kv, self.norm_k, context)
        if context_image is not None:
            out = out + self._attend(q, self.add_kv, self.norm_added_k, context_image)
        return self.to_out(out)


class WanTransformerBlock(nn.Module):
    """Self-attention, cross-attention and MLP. The residual stream is updated in float32: the
    modulation table plus the timestep projection gives (shift, scale, gate) for attention and MLP."""

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim, heads, head_dim, eps = config.inner_dim, config.num_attention_heads, config.attention_head_dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps=eps)
        self.attn1 = WanSelfAttention(dim, heads, head_dim, eps)
        self.attn2 = WanCrossAttention(dim, heads, head_dim, eps, config.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps=eps, elementwise_affine=True) if config.cross_attn_norm else None
        self.ffn = FeedForward(dim, config.ffn_dim, act="gelu_tanh")
        self.norm3 = FP32LayerNorm(dim, eps=eps)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim), requires_grad=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, S, D]; temb [B, T, 6, D] with T = 1 (one timestep per sample) or S (per token)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table + temb.float()
        ).unbind(2)
        dtype = hidden_states.dtype

        x = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).to(dtype)
        hidden_states = (hidden_states.float() + self.attn1(x, rotary_emb) * gate_msa).to(dtype)

        x = self.norm2(hidden_states.float()).to(dtype) if self.norm2 is not None else hidden_states
        hidden_states = hidden_states + self.attn2(x, encoder_hidden_states, encoder_hidden_states_image)

        x = (self.norm3(hidden_states.float()) * (1 + scale_mlp) + shift_mlp).to(dtype)
        return (hidden_states.float() + self.ffn(x).float() * gate_mlp).to(dtype)


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: LayerNorm, GELU MLP, LayerNorm (in fp32)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim, eps=1e-5, elementwise_affine=True)
        self.ff = FeedForward(image_dim, image_dim, dim_out=dim, act="gelu")
        self.norm2 = FP32LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.empty(1, pos_embed_seq_len, image_dim), requires_grad=False)
        else:
            self.pos_embed = None

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            # First-last-frame: the two images' tokens become one sequence with learned positions.
            image_tokens = image_tokens.reshape(-1, self.pos_embed.shape[1], image_tokens.shape[-1]) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image_tokens)))


class WanConditionEmbedding(nn.Module):
    """Timestep -> (temb for the output layer, per-block modulation projection); text (and image)
    embeddings -> model width."""

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = TwoLayerMLP(config.freq_dim, dim, act="silu")
        self.time_proj = ReplicatedLinear(dim, 6 * dim)
        self.text_embedder = TwoLayerMLP(config.text_dim, dim, act="gelu_tanh")
        self.image_embedder = (
            WanImageEmbedding(config.image_dim, dim, config.pos_embed_seq_len) if config.image_dim is not None else None
        )

    def forward(
        self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """timestep [B] or [B, S] -> temb [B, T, D], modulation [B, T, 6, D] (T = 1 or S)."""
        per_sample = timestep.dim() == 1
        sinusoid = timestep_embedding(timestep.flatten(), self.freq_dim).unflatten(0, timestep.shape)
        temb = self.time_embedder(sinusoid.to(text.dtype))
        if per_sample:
            temb = temb[:, None]
        modulation = self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))
        image = self.image_embedder(image) if image is not None else None
        return temb, modulation, self.text_embedder(text), image


class WanTransformer3DModel(nn.Module):
    # Regional compile; HSDP sharding, the step caches' and offload's block lists derive from it.
    _repeated_blocks = ["WanTransformerBlock"]

    # TeaCache's signal is the timestep modulation every block receives (time_proj of the timestep
    # embedding, "e0" in Wan's code), in float32 as the TeaCache authors compute it. It depends on the
    # timestep only, so both CFG branches (and all prompts of a batch) always agree.
    @staticmethod
    def _teacache_modulated_input(block, hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        return temb.float()

    @property
    def _teacache_coefficients(self) -> tuple[float, ...] | None:
        """The published polynomial for this checkpoint's size and mode (see WAN_TEACACHE), or None."""
        return WAN_TEACACHE.get(wan_teacache_key(self.config), {}).get("coefficients")

    @property
    def _cache_defaults(self) -> dict:
        """TeaCache: the authors' settings for this size and mode (5 warm-up steps, their "ret_steps");
        Cache-DiT: the built-in defaults (nothing measured on real Wan weights here)."""
        entry = WAN_TEACACHE.get(wan_teacache_key(self.config))
        if entry is None:
            return {}
        return {"tea_cache": {"rel_l1_thresh": entry["rel_l1_thresh"], "warmup_steps": RET_STEPS}}
    # Video tokens are split along the sequence before the first block and gathered after the output
    # norm; the RoPE tables are split the same way. Text and image tokens (cross-attention keys) stay
    # whole on every rank. Per-token timesteps (Wan2.2 TI2V) are declared by WanTI2VTransformer3DModel.
    _sp_plan = {
        "rope": {
            0: SequenceParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: SequenceParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        "blocks.0": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3)},
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }


    # (our fused parameter, diffusers parameter, shard id)
    stacked_params_mapping = [
        *fused_qkv(".attn1."),
        *fused_kv(".attn2."),
        *fused_kv(".attn2.", "add_kv", ("add_k_proj", "add_v_proj")),
    ]
    # diffusers name fragment -> ours
    weight_renames = [
        (".to_out.0.", ".to_out."),
        *feed_forward_renames(".ffn.", ".ff."),
    ]
    # Present in some converted checkpoints, unused by the model (diffusers ignores them too).
    ignored_checkpoint_keys = (".norm_added_q.",)

    def __init__(self, config: WanTransformerConfig | None = None, *, od_config=None):
        super().__init__()
        config = config or WanTransformerConfig()
        self.config = config
        dim = config.inner_dim
        self.out_channels = config.out_channels or config.in_channels
        self.rope = MultiAxisRoPE(theta=10000.0, axes_dim=rope_axes_dims(config.attention_head_dim))
        patch = config.patch_size
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=patch, stride=patch)
        self.condition_embedder = WanConditionEmbedding(config)
        self.blocks = nn.ModuleList(WanTransformerBlock(config) for _ in range(config.num_layers))
        self.norm_out = FP32LayerNorm(dim, eps=config.eps)
        self.proj_out = ReplicatedLinear(dim, self.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim), requires_grad=False)
        for p in (self.patch_embedding.weight, self.patch_embedding.bias):
            p.requires_grad_(False)

    @property
    def has_image_input(self) -> bool:
        return self.condition_embedder.image_embedder is not None

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, C_in, F, H, W] latents, timestep [B] (or [B, S] per patch token, Wan2.2
        TI2V) in [0, 1000], encoder_hidden_states [B, L, text_dim], encoder_hidden_states_image
        [B, L_img, image_dim] (Wan2.1 image-to-video) -> predicted velocity [B, C_out, F, H, W]."""
        if (encoder_hidden_states_image is None) == self.has_image_input:
            raise ValueError(
                "encoder_hidden_states_image must be given exactly when the model has image conditioning "
                f"(image_dim={self.config.image_dim})"
            )
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        rotary_emb = self.rope(grid_positions(*grid, device=hidden_states.device))

        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, modulation, context, context_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        for block in self.blocks:
            hidden_states = block(hidden_states, context, modulation, rotary_emb, context_image)

        # Output modulation: (shift, scale) from the table plus temb, in the model dtype (as diffusers).
        shift, scale = (self.scale_shift_table + temb[:, :, None]).unbind(2)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).to(hidden_states.dtype)
        hidden_states = self.proj_out(hidden_states)
        return self.unpatchify(hidden_states, batch, grid)

    def unpatchify(self, tokens: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, F'*H'*W', p_t*p_h*p_w*C] -> [B, C, F'*p_t, H'*p_h, W'*p_w]."""
        p_t, p_h, p_w = self.config.patch_size
        x = tokens.reshape(batch, *grid, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def load_weights(self, weights) -> set[str]:
        kept = ((n, t) for n, t in weights if not any(k in n for k in self.ignored_checkpoint_keys))
        return load_weights_with_mapping(self, kept, self.stacked_params_mapping, self.weight_renames)


class WanTI2VTransformer3DModel(WanTransformer3DModel):
    """Wan2.2 TI2V-5B: the same network, called with one timestep per patch token ([B, S]). Under
    sequence parallelism those timesteps are split like the tokens they belong to."""

    _sp_plan = {
        **WanTransformer3DModel._sp_plan,
        "": {"timestep": SequenceParallelInput(split_dim=1, expected_dims=2)},
    }
