"""Qwen-Image MMDiT: dual-stream blocks only (text and image tokens keep separate weights and attend
jointly, text first), with a padded, masked prompt and a 3-axis RoPE over (frame, row, column) whose
text positions follow the image's.

Numerically equal to diffusers' QwenImageTransformer2DModel; weights load from its checkpoints, with
q/k/v fused into one projection per stream. Variants, from the config:
- `zero_cond_t` (Qwen-Image-Edit-2511): the image tokens of the reference images (every image after
  the first in `img_shapes`) are modulated with the timestep-0 embedding, the noisy image's with t;
- `use_additional_t_cond` + `use_layer3d_rope` (Qwen-Image-Layered): a learned embedding of a 0/1
  condition is added to the timestep embedding, and the last image (the input) sits at frame -1.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from diffserve.distributed.sp_plan import SequenceParallelInput, SequenceParallelOutput
from diffserve.layers.adaln import AdaLayerNormContinuous, AdaLNModulation
from diffserve.layers.attention import Attention
from diffserve.layers.embeddings import TwoLayerMLP, timestep_embedding
from diffserve.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from diffserve.layers.mlp import FeedForward
from diffserve.layers.norm import LayerNorm, RMSNorm
from diffserve.layers.rope import MultiAxisRoPE, apply_rotary_emb, grid_positions
from diffserve.loader.utils import feed_forward_renames, joint_attention_qkv, load_weights_with_mapping
from diffserve.models.model_config import ModelConfig

ImageShape = tuple[int, int, int]  # (frames, rows, columns) of one image's patch grid
RotaryTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # image cos, sin; text cos, sin


@dataclass(frozen=True)
class QwenImageTransformerConfig(ModelConfig):
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    # Written by the diffusers version Qwen/Qwen-Image was released with; no layer uses it (diffusers
    # now ignores it too).
    pooled_projection_dim: int | None = None

    def __post_init__(self):
        if self.guidance_embeds:
            # diffusers accepts the key, but the model has no guidance embedding and its forward fails
            # when given a guidance value; no released checkpoint sets it.
            raise ValueError("guidance_embeds=True is not supported: Qwen-Image has no guidance embedding")
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be three widths (frame, row, column) summing to "
                f"attention_head_dim {self.attention_head_dim}"
            )


def _is_image_shape(shape) -> bool:
    return isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(n, numbers.Integral) for n in shape)


def image_shapes_of(img_shapes: Sequence[Sequence[Sequence[int]]]) -> tuple[ImageShape, ...]:
    """The per-image (frames, rows, columns) of diffusers' `img_shapes` (one list of images per batch
    row; the first is the image being denoised, the rest are reference images). The RoPE table is
    shared by the batch, so every row must list the same shapes."""
    rows_valid = [isinstance(row, (list, tuple)) and row and all(map(_is_image_shape, row)) for row in img_shapes]
    if not rows_valid or not all(rows_valid):
        raise ValueError(
            f"img_shapes must be one list of (frames, rows, columns) per batch row, got {img_shapes!r}"
        )
    rows = [tuple(tuple(int(n) for n in shape) for shape in row) for row in img_shapes]
    if any(row != rows[0] for row in rows):
        raise ValueError(f"every batch row must have the same image shapes, got {rows}")
    return rows[0]


class QwenImageRoPE(nn.Module):
    """RoPE tables (cos, sin) of the image tokens and of the text tokens, [S, head_dim] each.

    Image i's patches sit at frame i (with `layered`, the last image, the input, at frame -1) and at
    rows/columns centred on 0; the text tokens follow on all three axes, after the largest image
    position (or the number of layers, if larger). It holds no weights: it is a module so that
    sequence parallelism can split its image tables.
    """

    def __init__(self, axes_dim: Sequence[int], layered: bool = False, theta: float = 10000.0):
        super().__init__()
        # Phases in float32, as Qwen-Image's reference computes them (and the model was trained with).
        self.rope = MultiAxisRoPE(theta=theta, axes_dim=axes_dim, freq_dtype=torch.float32)
        self.layered = layered

    def _image_positions(self, image_shapes: tuple[ImageShape, ...], device: torch.device) -> torch.Tensor:
        positions = []
        for i, (frames, rows, cols) in enumerate(image_shapes):
            grid = grid_positions(frames, rows, cols, device=device)
            # Offsets added as Python numbers: a tensor built from them would be a host-to-device copy.
            grid[:, 0] += -1 if self.layered and i == len(image_shapes) - 1 else i
            grid[:, 1] -= rows - rows // 2
            grid[:, 2] -= cols - cols // 2
            positions.append(grid)
        return torch.cat(positions)

    def _first_text_position(self, image_shapes: tuple[ImageShape, ...]) -> int:
        first = max(max(rows // 2, cols // 2) for _, rows, cols in image_shapes)
        return max(first, len(image_shapes) - 1) if self.layered else first

    def forward(self, image_shapes: tuple[ImageShape, ...], text_len: int, device: torch.device) -> RotaryTables:
        image_cos, image_sin = self.rope(self._image_positions(image_shapes, device))
        start = self._first_text_position(image_shapes)
        text = torch.arange(start, start + text_len, dtype=torch.float32, device=device)
        text_cos, text_sin = self.rope(text[:, None].expand(-1, 3))
        return image_cos, image_sin, text_cos, text_sin


class ReferenceTokenMask(nn.Module):
    """[S_img] bool, True for the tokens of the reference images (every image after the first): with
    `zero_cond_t` they take the timestep-0 modulation. A module so that sequence parallelism can
    split it with the image tokens."""

    def forward(self, image_shapes: tuple[ImageShape, ...], device: torch.device) -> torch.Tensor:
        total = sum(f * h * w for f, h, w in image_shapes)
        first = image_shapes[0][0] * image_shapes[0][1] * image_shapes[0][2]
        return torch.arange(total, device=device) >= first


class QwenImageTimestepEmbedding(nn.Module):
    def __init__(self, dim: int, use_additional_t_cond: bool):
        super().__init__()
        self.timestep_embedder = TwoLayerMLP(256, dim)
        # Qwen-Image-Layered: a learned vector per value (0 or 1) of an extra condition.
        self.addition_t_embedding = nn.Embedding(2, dim) if use_additional_t_cond else None

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype, additional_t_cond: torch.Tensor | None):
        """timestep [N] in [0, 1] -> [N, dim]; additional_t_cond [B] of 0/1, N a multiple of B."""
        sinusoid = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        emb = self.timestep_embedder(sinusoid.to(dtype))
        if self.addition_t_embedding is None:
            return emb
        extra = self.addition_t_embedding(additional_t_cond).to(dtype)
        return emb + extra.repeat(emb.shape[0] // extra.shape[0], 1)


class QwenImageJointAttention(nn.Module):
    """Joint attention over [text; image]: each stream has its own q/k/v, q/k norms, RoPE table and
    output projection."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.head_dim = head_dim
        self.to_qkv = QKVParallelLinear(dim, head_dim, num_heads, bias=True)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.add_qkv = QKVParallelLinear(dim, head_dim, num_heads, bias=True)
        self.norm_added_q = RMSNorm(head_dim, eps=eps)
        self.norm_added_k = RMSNorm(head_dim, eps=eps)
        self.to_out = RowParallelLinear(num_heads * head_dim, dim, bias=True)
        self.to_add_out = RowParallelLinear(num_heads * head_dim, dim, bias=True)
        self.attn = Attention(self.to_qkv.num_heads, head_dim)

    def _project(self, qkv_proj, norm_q, norm_k, x, cos, sin):
        # Unflatten with -1 heads: under TP this rank holds only its share of the heads.
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in qkv_proj.split_qkv(qkv_proj(x)))
        return apply_rotary_emb(norm_q(q), cos, sin), apply_rotary_emb(norm_k(k), cos, sin), v

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        rotary_emb: RotaryTables,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_cos, image_sin, text_cos, text_sin = rotary_emb
        q, k, v = self._project(self.to_qkv, self.norm_q, self.norm_k, image, image_cos, image_sin)
        tq, tk, tv = self._project(self.add_qkv, self.norm_added_q, self.norm_added_k, text, text_cos, text_sin)
        # Text first, as in diffusers; key_mask [B, S_txt + S_img] follows the same order.
        out = self.attn(torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1), key_mask)
        out = out.flatten(2, 3)
        text_len = text.shape[1]
        return self.to_out(out[:, text_len:].contiguous()), self.to_add_out(out[:, :text_len].contiguous())


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, S, D]; shift, scale [B, 1, D] (one per row) or [B, S, D] (one per token)."""
    return x * (1 + scale) + shift


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # fp16 overflows to inf in the residual streams of the later blocks; bf16/fp32 need no clip.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class QwenImageTransformerBlock(nn.Module):
    """Dual-stream block: adaLN-Zero modulation, joint attention and an MLP per stream."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.img_mod = AdaLNModulation(dim, 6)
        self.img_norm1 = LayerNorm(dim, eps=eps)
        self.attn = QwenImageJointAttention(dim, num_heads, head_dim, eps=eps)
        self.img_norm2 = LayerNorm(dim, eps=eps)
        self.img_mlp = FeedForward(dim, 4 * dim, act="gelu_tanh")
        self.txt_mod = AdaLNModulation(dim, 6)
        self.txt_norm1 = LayerNorm(dim, eps=eps)
        self.txt_norm2 = LayerNorm(dim, eps=eps)
        self.txt_mlp = FeedForward(dim, 4 * dim, act="gelu_tanh")

    def image_modulation(self, temb: torch.Tensor, reference_tokens: torch.Tensor | None):
        """(shift, scale, gate) for attention then MLP, each [B, 1, D]; with reference_tokens, temb is
        [2B, D] (timestep t, then 0) and each is [B, S_img, D], the timestep-0 values at reference tokens."""
        params = self.img_mod(temb)
        if reference_tokens is None:
            return [p[:, None] for p in params]
        batch = temb.shape[0] // 2
        return [torch.where(reference_tokens[None, :, None], p[batch:, None], p[:batch, None]) for p in params]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: RotaryTables,
        key_mask: torch.Tensor | None = None,
        reference_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.image_modulation(temb, reference_tokens)
        # The text always takes timestep t: the first B rows of temb (B the image batch; as in diffusers,
        # a single prompt's text broadcasts over a batch of images).
        text_params = self.txt_mod(temb[: hidden_states.shape[0]])
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = (p[:, None] for p in text_params)

        image = _modulate(self.img_norm1(hidden_states), shift1, scale1)
        text = _modulate(self.txt_norm1(encoder_hidden_states), t_shift1, t_scale1)
        image_attn, text_attn = self.attn(image, text, rotary_emb, key_mask)
        hidden_states = hidden_states + gate1 * image_attn
        encoder_hidden_states = encoder_hidden_states + t_gate1 * text_attn

        image_mlp = self.img_mlp(_modulate(self.img_norm2(hidden_states), shift2, scale2))
        hidden_states = hidden_states + gate2 * image_mlp
        text_mlp = self.txt_mlp(_modulate(self.txt_norm2(encoder_hidden_states), t_shift2, t_scale2))
        encoder_hidden_states = encoder_hidden_states + t_gate2 * text_mlp
        return _clip_fp16(encoder_hidden_states), _clip_fp16(hidden_states)


class QwenImageTransformer2DModel(nn.Module):
    _repeated_blocks = ["QwenImageTransformerBlock"]
    _layerwise_offload_blocks_attrs = ["transformer_blocks"]
    # Sequence parallel: both streams are split along the sequence, as for FLUX: each rank attends
    # [its text part; its image part] and the attention layer gathers (Ulysses) or passes around (ring)
    # the keys with their mask. The image tokens are split on entry with their RoPE tables and
    # reference-token flags, and gathered before the final projection. The text is split at the first
    # block, after its RoPE table was computed from the whole prompt; the text mask is split on entry
    # (the joint key mask is built from it and the local image length). A text length that does not
    # divide by the degree is padded with masked positions (`pad`, `mask_of`): padded keys are never
    # attended and the text stream is never gathered.
    _sp_plan = {
        "": {
            "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3),
            "encoder_hidden_states_mask": SequenceParallelInput(
                split_dim=1, expected_dims=2, mask_of="encoder_hidden_states"
            ),
        },
        "pos_embed": {
            0: SequenceParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: SequenceParallelInput(split_dim=0, expected_dims=2, split_output=True),
            2: SequenceParallelInput(split_dim=0, expected_dims=2, split_output=True, pad=True),
            3: SequenceParallelInput(split_dim=0, expected_dims=2, split_output=True, pad=True),
        },
        "reference_tokens": {0: SequenceParallelInput(split_dim=0, expected_dims=1, split_output=True)},
        "transformer_blocks.0": {"encoder_hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, pad=True)},
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

    @staticmethod
    def _is_transformer_block(name: str, module: nn.Module) -> bool:
        return isinstance(module, QwenImageTransformerBlock)

    _hsdp_shard_conditions = [_is_transformer_block]

    # Step caching (diffserve.cache): block(hidden_states, encoder_hidden_states, temb, rotary_emb,
    # key_mask, reference_tokens) -> (encoder_hidden_states, hidden_states) is cache-dit's Pattern_1.
    _cache_blocks = {"transformer_blocks": "Pattern_1"}

    @staticmethod
    def _teacache_modulated_input(
        block, hidden_states, encoder_hidden_states, temb, rotary_emb, key_mask=None, reference_tokens=None
    ):
        """TeaCache's signal: the first block's adaLN-modulated image tokens. No coefficients are fitted
        for Qwen-Image yet: pass cache_config['coefficients'] or fit them."""
        shift, scale = block.image_modulation(temb, reference_tokens)[:2]
        return _modulate(block.img_norm1(hidden_states), shift, scale)

    # (our fused parameter, diffusers parameter, shard id)
    stacked_params_mapping = joint_attention_qkv()
    # diffusers name fragment -> ours
    weight_renames = [
        (".img_mod.1.", ".img_mod.linear."),
        (".txt_mod.1.", ".txt_mod.linear."),
        (".attn.to_out.0.", ".attn.to_out."),
        *feed_forward_renames(".img_mlp.", ".txt_mlp."),
    ]

    def __init__(self, config: QwenImageTransformerConfig | None = None, *, od_config=None):
        super().__init__()
        config = config or QwenImageTransformerConfig()
        self.config = config
        self.out_channels = config.out_channels or config.in_channels
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        dim = heads * head_dim
        self.inner_dim = dim
        self.pos_embed = QwenImageRoPE(config.axes_dims_rope, layered=config.use_layer3d_rope)
        self.reference_tokens = ReferenceTokenMask()
        self.time_text_embed = QwenImageTimestepEmbedding(dim, config.use_additional_t_cond)
        self.txt_norm = RMSNorm(config.joint_attention_dim, eps=1e-6)
        self.img_in = ReplicatedLinear(config.in_channels, dim)
        self.txt_in = ReplicatedLinear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = ReplicatedLinear(dim, config.patch_size**2 * self.out_channels)

    def _check_additional_t_cond(self, additional_t_cond: torch.Tensor | None) -> None:
        if (additional_t_cond is None) == self.config.use_additional_t_cond:
            raise ValueError(
                "additional_t_cond must be given exactly when the model has an additional timestep condition "
                f"(use_additional_t_cond={self.config.use_additional_t_cond})"
            )

    @staticmethod
    def _joint_key_mask(text_mask: torch.Tensor | None, image_len: int) -> torch.Tensor | None:
        """[B, S_txt] text mask (1/True = a real token, 0/False = padding) -> [B, S_txt + S_img] boolean
        key mask over [text; image]; image keys are always valid. None (no padding) stays None."""
        if text_mask is None:
            return None
        image_mask = text_mask.new_ones(text_mask.shape[0], image_len, dtype=torch.bool)
        return torch.cat([text_mask.bool(), image_mask], dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        img_shapes: Sequence[Sequence[Sequence[int]]],
        additional_t_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, S_img, in_channels]: packed latents of the images of `img_shapes` (the one
        being denoised first, then any reference images), encoder_hidden_states [B, S_txt, D_txt] with
        encoder_hidden_states_mask [B, S_txt] (or None when nothing is padded), timestep [B] in [0, 1],
        img_shapes as in diffusers (per batch row, the (frames, rows, columns) of each image's patch
        grid) -> predicted velocity [B, S_img, patch_size**2 * out_channels] for every image token."""
        self._check_additional_t_cond(additional_t_cond)
        image_shapes = image_shapes_of(img_shapes)
        hidden_states = self.img_in(hidden_states)
        dtype, device, batch = hidden_states.dtype, hidden_states.device, hidden_states.shape[0]
        timestep = timestep.to(dtype)
        reference_tokens = None
        if self.config.zero_cond_t:
            # One embedding for timestep t and one for 0: reference images take the latter.
            timestep = torch.cat([timestep, timestep * 0])
            reference_tokens = self.reference_tokens(image_shapes, device)
        temb = self.time_text_embed(timestep, dtype, additional_t_cond)
        encoder_hidden_states = self.txt_in(self.txt_norm(encoder_hidden_states))
        rotary_emb = self.pos_embed(image_shapes, encoder_hidden_states.shape[1], device)
        key_mask = self._joint_key_mask(encoder_hidden_states_mask, hidden_states.shape[1])

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states, encoder_hidden_states, temb, rotary_emb, key_mask, reference_tokens
            )
        return self.proj_out(self.norm_out(hidden_states, temb[:batch]))

    def load_weights(self, weights) -> set[str]:
        return load_weights_with_mapping(self, weights, self.stacked_params_mapping, self.weight_renames)
