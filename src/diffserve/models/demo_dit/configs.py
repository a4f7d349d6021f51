"""Configs of the built-in demo model's two networks, shared by the reference (training) model and ours.

Plain data: no torch, so the training script and the tests can read a checkpoint's config.json without
building anything. Unknown keys are an error naming them.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffserve.models.model_config import ModelConfig


# Sampling defaults when a checkpoint's model_index.json does not set them (the training script writes
# the guidance scale it chose there, and the schedule shift into scheduler_config.json).
DEFAULT_NUM_INFERENCE_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_SHIFT = 1.0


@dataclass(frozen=True)
class DemoDiTConfig(ModelConfig):
    """Pixel-space DiT: an image of `sample_size`^2 pixels becomes (sample_size/patch_size)^2 tokens
    that attend jointly with the text tokens in every block."""

    _class_name = "DemoDiTTransformer2DModel"

    sample_size: int = 64
    patch_size: int = 4
    in_channels: int = 3
    num_layers: int = 8
    num_attention_heads: int = 6
    attention_head_dim: int = 32
    # Width of the text encoder's hidden states.
    text_dim: int = 192
    mlp_ratio: float = 4.0
    # 2-D RoPE: (row, column) dims, summing to attention_head_dim. Positions run to sample_size/patch_size
    # only, so a small theta spreads the frequencies over that range.
    rope_axes_dim: tuple[int, ...] = (16, 16)
    rope_theta: float = 100.0

    def __post_init__(self) -> None:
        if sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim {self.rope_axes_dim} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_channels(self) -> int:
        return self.in_channels * self.patch_size**2


@dataclass(frozen=True)
class DemoTextEncoderConfig(ModelConfig):
    """A small bidirectional transformer over word tokens with learned positions."""

    _class_name = "DemoTextEncoder"

    vocab_size: int = 32
    max_length: int = 16
    hidden_size: int = 192
    num_layers: int = 2
    num_attention_heads: int = 6
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
