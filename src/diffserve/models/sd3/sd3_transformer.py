"""Stable Diffusion 3 / 3.5 MMDiT: patchified latents and projected text tokens attend jointly in
every block, each stream with its own adaLN-Zero modulation, projections and MLP.

Variants, all from one config:
- SD3-medium: no q/k normalization;
- SD3.5-large / large-turbo: per-head RMS q/k normalization (`qk_norm="rms_norm"`);
- SD3.5-medium: q/k normalization plus, in the blocks listed in `dual_attention_layers`, a second
  self-attention over the image tokens only, modulated by three more adaLN chunks.
The last block is "context pre-only": the text tokens still feed its joint attention, but nothing of
the text stream comes out of it.

Numerically equal to diffusers' SD3Transformer2DModel; weights load from its checkpoints, with q/k/v
fused into one projection per stream. `skip_layers` skips blocks by index, as diffusers' pipeline
does for skip-layer guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from diffserve.distributed.sp_plan import SequenceParallelInput, SequenceParallelOutput
from diffserve.layers.adaln import AdaLayerNormContinuous, AdaLayerNormZero, AdaLNModulation, modulate
from diffserve.layers.attention import Attention
from diffserve.layers.embeddings import TimeTextEmbedding
from diffserve.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from diffserve.layers.mlp import FeedForward
from diffserve.layers.norm import LayerNorm, RMSNorm
from diffserve.loader.utils import feed_forward_renames, joint_attention_qkv, load_weights_with_mapping
from diffserve.models.model_config import ModelConfig

# q/k normalizations SD3 checkpoints use: none (SD3) or per-head RMSNorm (SD3.5).
QK_NORMS = (None, "rms_norm")


@dataclass(frozen=True)
class SD3TransformerConfig(ModelConfig):
    # Defaults are diffusers' SD3Transformer2DModel defaults.
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3 transformer qk_norm={self.qk_norm!r} is not supported; supported: {QK_NORMS}")
        if self.caption_projection_dim != self.inner_dim:
            # The text stream enters the blocks at the model width; diffusers builds other values but
            # cannot run them.
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads * "
                f"attention_head_dim ({self.inner_dim})"
            )
        if not isinstance(self.pos_embed_max_size, int):
            raise ValueError(
                f"pos_embed_max_size must be an int (SD3 crops a fixed table), got {self.pos_embed_max_size!r}"
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are not block indices (num_layers={self.num_layers})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def sincos_position_table_2d(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table [grid_size**2, dim] (float32), rows in row-major order.

    The first half of each row encodes the column, the second half the row, each as [sin, cos] of the
    position times 10000^(-i / (dim/4)), with positions rescaled so that `base_size` cells span the
    grid. Positions are rescaled in float32 and the angles taken in float64, as diffusers computes the
    table, so this equals the one in its checkpoints bit for bit.
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos table needs a width divisible by 4, got {dim}")
    positions = (torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)).double()
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    angles = torch.outer(positions, omega)
    # One axis' table is small; rounding it to float32 before the 2D expansion gives the same values
    # without a float64 table of grid_size**2 rows (1.8 GB for SD3.5-medium).
    axis = torch.cat([angles.sin(), angles.cos()], dim=1).float()  # [grid_size, dim / 2]
    columns = axis[None, :, :].expand(grid_size, -1, -1)
    rows = axis[:, None, :].expand(-1, grid_size, -1)
    return torch.cat([columns, rows], dim=-1).reshape(grid_size * grid_size, dim)


class SD3PatchEmbed(nn.Module):
    """Latents [B, C, H, W] -> tokens [B, (H/p)(W/p), D]: a strided conv patchifies, then the centre
    (H/p) x (W/p) crop of a fixed position table is added.

    The table (`pos_embed`, [1, max_size**2, D]) is a checkpoint tensor, as in diffusers: it is loaded,
    not recomputed, so the model uses exactly the values it was trained with. It is initialized to the
    sin-cos table those checkpoints hold.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, max_size: int, base_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.max_size = max_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        for p in self.proj.parameters():
            p.requires_grad_(False)
        self.register_buffer("pos_embed", sincos_position_table_2d(dim, max_size, base_size)[None])

    def cropped_position_table(self, height: int, width: int) -> torch.Tensor:
        """The centre height x width crop of the table (sizes in patches), as [1, height * width, D]."""
        if height > self.max_size or width > self.max_size:
            raise ValueError(
                f"latent grid {height}x{width} patches exceeds the position table ({self.max_size}x{self.max_size}); "
                f"the largest image is {self.max_size * self.patch_size} latent pixels per side"
            )
        top, left = (self.max_size - height) // 2, (self.max_size - width) // 2
        table = self.pos_embed.unflatten(1, (self.max_size, self.max_size))
        return table[:, top : top + height, left : left + width].flatten(1, 2)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = latents.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {self.patch_size}")
        tokens = self.proj(latents).flatten(2).transpose(1, 2)
        table = self.cropped_position_table(height // self.patch_size, width // self.patch_size)
        return (tokens + table).to(tokens.dtype)


class SD35AdaLayerNormZeroX(AdaLNModulation):
    """adaLN-Zero for a block with a second self-attention (SD3.5 dual-attention blocks): nine chunks,
    the last three (shift, scale, gate) modulating the same normalized input for that attention."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, 9)
        self.norm = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = (
            super().forward(emb)
        )
        normed = self.norm(x)
        return (
            modulate(normed, shift_msa, scale_msa),
            gate_msa,
            shift_mlp,
            scale_mlp,
            gate_mlp,
            modulate(normed, shift_msa2, scale_msa2),
            gate_msa2,
        )


class SD3Attention(nn.Module):
    """Self-attention over one stream or, with `joint`, joint attention over [image; text] where the
    text stream has its own q/k/v projections (and, unless `context_pre_only`, its own output one).
    `qk_norm="rms_norm"` RMS-normalizes each head of q and k."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qk_norm: str | None, joint: bool, context_pre_only: bool = False
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.head_dim = head_dim
        self.to_qkv = QKVParallelLinear(dim, head_dim, num_heads, bias=True)
        self.norm_q, self.norm_k = self._qk_norms(qk_norm, head_dim)
        self.to_out = RowParallelLinear(inner, dim, bias=True)
        if joint:
            self.add_qkv = QKVParallelLinear(dim, head_dim, num_heads, bias=True)
            self.norm_added_q, self.norm_added_k = self._qk_norms(qk_norm, head_dim)
            self.to_add_out = None if context_pre_only else RowParallelLinear(inner, dim, bias=True)
        self.attn = Attention(self.to_qkv.num_heads, head_dim)

    @staticmethod
    def _qk_norms(qk_norm: str | None, head_dim: int) -> tuple[RMSNorm | None, RMSNorm | None]:
        if qk_norm is None:
            return None, None
        return RMSNorm(head_dim, eps=1e-6), RMSNorm(head_dim, eps=1e-6)

    def _project(self, qkv_proj: QKVParallelLinear, norm_q, norm_k, x: torch.Tensor):
        # Unflatten with -1 heads: under TP this rank holds only its share of the heads.
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in qkv_proj.split_qkv(qkv_proj(x)))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None):
        """Self-attention: -> image output. Joint: -> (image output, text output or None when the
        block is context pre-only)."""
        q, k, v = self._project(self.to_qkv, self.norm_q, self.norm_k, hidden_states)
        if encoder_hidden_states is None:
            return self.to_out(self.attn(q, k, v).flatten(2, 3))
        cq, ck, cv = self._project(self.add_qkv, self.norm_added_q, self.norm_added_k, encoder_hidden_states)
        # Image tokens first, as SD3 orders them (there is no RoPE, so order only matters for the split).
        q, k, v = torch.cat([q, cq], dim=1), torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)
        out = self.attn(q, k, v).flatten(2, 3)
        image_len = hidden_states.shape[1]
        image_out = self.to_out(out[:, :image_len].contiguous())
        if self.to_add_out is None:
            return image_out, None
        return image_out, self.to_add_out(out[:, image_len:].contiguous())


class SD3TransformerBlock(nn.Module):
    """MMDiT block: joint attention, then a per-stream MLP, each residual gated by adaLN-Zero.

    `dual_attention` adds a second self-attention over the image tokens (SD3.5-medium's first blocks);
    `context_pre_only` (the last block) drops the text stream's outputs and MLP.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qk_norm: str | None, context_pre_only: bool, dual_attention: bool
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = SD35AdaLayerNormZeroX(dim) if dual_attention else AdaLayerNormZero(dim)
        # The last block only needs the text stream's normalized input: (scale, shift) and no gates.
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = SD3Attention(dim, num_heads, head_dim, qk_norm, joint=True, context_pre_only=context_pre_only)
        self.attn2 = SD3Attention(dim, num_heads, head_dim, qk_norm, joint=False) if dual_attention else None
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, 4 * dim, act="gelu_tanh")
        if not context_pre_only:
            self.norm2_context = LayerNorm(dim, eps=1e-6)
            self.ff_context = FeedForward(dim, 4 * dim, act="gelu_tanh")

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (encoder_hidden_states, hidden_states). A context pre-only block hands the text stream
        back unchanged (diffusers returns None): nothing reads it, and every block then returns two
        tensors, which step caches rely on."""
        if self.attn2 is not None:
            x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2 = self.norm1(hidden_states, temb)
        else:
            x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        if self.context_pre_only:
            c = self.norm1_context(encoder_hidden_states, temb)
        else:
            c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)

        attn_out, context_attn_out = self.attn(x, c)
        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        if self.attn2 is not None:
            hidden_states = hidden_states + gate_msa2[:, None] * self.attn2(x2)
        ff_out = self.ff(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        hidden_states = hidden_states + gate_mlp[:, None] * ff_out

        if self.context_pre_only:
            return encoder_hidden_states, hidden_states
        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
        context_ff_out = self.ff_context(modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp, c_scale_mlp))
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * context_ff_out
        return encoder_hidden_states, hidden_states


class SD3Transformer2DModel(nn.Module):
    _repeated_blocks = ["SD3TransformerBlock"]
    _layerwise_offload_blocks_attrs = ["transformer_blocks"]
    # Image tokens are split along the sequence as they leave the patch embedding (a conv over the
    # whole latent, so the split goes on its output), text tokens as they enter the model. Joint
    # attention has no RoPE and no mask, so each rank may hold any share of either stream; the image
    # tokens are gathered after the output projection, before unpatchify. Both token counts must
    # divide by the sequence-parallel degree (SD3's text is 77 CLIP + max_sequence_length T5 tokens).
    _sp_plan = {
        "": {"encoder_hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3)},
        "pos_embed": {0: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

    @staticmethod
    def _is_transformer_block(name: str, module: nn.Module) -> bool:
        return isinstance(module, SD3TransformerBlock)

    _hsdp_shard_conditions = [_is_transformer_block]

    # Step caching (diffserve.cache): blocks are called positionally as
    # block(hidden_states, encoder_hidden_states, temb) -> (encoder_hidden_states, hidden_states).
    _cache_blocks = {"transformer_blocks": "Pattern_1"}

    # (our fused parameter, diffusers parameter, shard id); the same fragments serve attn and attn2.
    stacked_params_mapping = joint_attention_qkv(".")
    # diffusers name fragment -> ours
    weight_renames = [(".to_out.0.", ".to_out."), *feed_forward_renames(".ff.", ".ff_context.")]

    def __init__(self, config: SD3TransformerConfig | None = None, *, od_config=None):
        super().__init__()
        config = config or SD3TransformerConfig()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.out_channels = config.out_channels or config.in_channels
        self.pos_embed = SD3PatchEmbed(
            config.in_channels,
            dim,
            config.patch_size,
            config.pos_embed_max_size,
            base_size=config.sample_size // config.patch_size,
        )
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, guidance_embeds=False)
        self.context_embedder = ReplicatedLinear(config.joint_attention_dim, config.caption_projection_dim)
        last = config.num_layers - 1
        self.transformer_blocks = nn.ModuleList(
            SD3TransformerBlock(
                dim,
                heads,
                head_dim,
                config.qk_norm,
                context_pre_only=i == last,
                dual_attention=i in config.dual_attention_layers,
            )
            for i in range(config.num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = ReplicatedLinear(dim, config.patch_size**2 * self.out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        skip_layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, C_in, H, W] latents, encoder_hidden_states [B, S_txt, joint_attention_dim],
        pooled_projections [B, pooled_projection_dim], timestep [B] in [0, 1000] (as diffusers' SD3
        pipeline passes it) -> predicted velocity [B, C_out, H, W]. Blocks whose index is in
        `skip_layers` are not run (skip-layer guidance)."""
        skipped = self._checked_skip_layers(skip_layers)
        height, width = hidden_states.shape[-2:]
        hidden_states = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, None, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)

        for index, block in enumerate(self.transformer_blocks):
            if index not in skipped:
                encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb)

        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        return self.unpatchify(hidden_states, height, width)

    def _checked_skip_layers(self, skip_layers: Sequence[int] | None) -> frozenset[int]:
        if not skip_layers:
            return frozenset()
        num_layers = self.config.num_layers
        if len(self.transformer_blocks) != num_layers:
            # A step cache that stands in for the block list hides the indices skip_layers refers to.
            raise ValueError(
                f"skip_layers needs the {num_layers} transformer blocks in place, but transformer_blocks holds "
                f"{len(self.transformer_blocks)} module(s) (a step cache wrapping the blocks?)"
            )
        bad = [i for i in skip_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"skip_layers {bad} are not block indices; the model has {num_layers} blocks")
        return frozenset(skip_layers)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, (H/p)(W/p), p*p*C] -> [B, C, H, W]; height and width are the latent sizes."""
        p = self.config.patch_size
        x = tokens.reshape(tokens.shape[0], height // p, width // p, p, p, self.out_channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], self.out_channels, height, width)

    def load_weights(self, weights) -> set[str]:
        """Returns the names filled: every parameter and the position table buffer."""
        return load_weights_with_mapping(self, weights, self.stacked_params_mapping, self.weight_renames)
