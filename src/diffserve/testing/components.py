"""Tiny random-weight components shared by the checkpoint builders (text encoders, VAEs), so each
family's builder states only what is its own."""

from __future__ import annotations

from typing import Any

import torch


def perturb_(module: torch.nn.Module, scale: float, generator: torch.Generator) -> None:
    """Add noise to every parameter so no norm weight is exactly 1 and no bias exactly 0: a port that
    swaps two such parameters must then produce a different output."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)


def tiny_clip_text_model(tokenizer, model_class: Any = None, **overrides):
    """A 2-layer CLIP text encoder (hidden 32) for `tokenizer`; `model_class` e.g.
    CLIPTextModelWithProjection (default CLIPTextModel)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0,
                  eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return (model_class or CLIPTextModel)(CLIPTextConfig(**{**config, **overrides})).eval()


def tiny_t5_encoder(tokenizer, model_class: Any = None, config_class: Any = None, **overrides):
    """A 2-layer T5 encoder (d_model 32) for `tokenizer`; `model_class`/`config_class` e.g.
    UMT5EncoderModel/UMT5Config (default T5EncoderModel/T5Config)."""
    from transformers import T5Config, T5EncoderModel

    config = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return (model_class or T5EncoderModel)((config_class or T5Config)(**{**config, **overrides})).eval()


def tiny_autoencoder_kl(**overrides):
    """A 2-level AutoencoderKL (8x downsampling halved to 2x) with 4 latent channels."""
    from diffusers import AutoencoderKL

    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=32)
    return AutoencoderKL(**{**config, **overrides}).eval()
