"""Stable Diffusion 3 / 3.5 (medium, large, large-turbo)."""

from diffserve.models.sd3.sd3_transformer import SD3Transformer2DModel, SD3TransformerConfig

__all__ = ["SD3Transformer2DModel", "SD3TransformerConfig"]
