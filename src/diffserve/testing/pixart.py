"""Tiny random-weight PixArt-Sigma checkpoints in the exact diffusers layout (served through the
diffusers adapter: diffserve has no native PixArt pipeline).

PixArt generates at the aspect-ratio bins of its sample size (diffusers' `use_resolution_binning`,
on by default) and resizes to the requested size; sample_size 32 selects the 256-pixel bins, which
the 8x VAE turns into latents of about 32x32 (256 tokens of 2x2 patches).
"""

from __future__ import annotations

import torch

from diffserve.testing.components import perturb_, tiny_autoencoder_kl, tiny_t5_encoder
from diffserve.testing.tokenizers import build_t5_tokenizer


def build_tiny_pixart_sigma(path: str, seed: int = 0) -> str:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(max_length=300)
    text_encoder = tiny_t5_encoder(tokenizer)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        out_channels=8,  # PixArt predicts noise and variance; the pipeline keeps the first half
        cross_attention_dim=24,
        caption_channels=32,  # the T5 width
        norm_num_groups=4,
    )
    perturb_(transformer, 0.05, torch.Generator().manual_seed(seed + 1))
    # Four levels: the real 8x spatial compression the resolution bins assume.
    vae = tiny_autoencoder_kl(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                              block_out_channels=[8, 8, 8, 8], scaling_factor=0.13025)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
