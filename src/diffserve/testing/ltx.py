"""Tiny random-weight LTX-Video checkpoints in the exact diffusers layout (served through the diffusers
adapter: diffserve has no native LTX pipeline).

The VAE compresses 4x in space and 4x in time (two spatio-temporal levels, no pixel patching), so
32x32 pixels and 9 frames are 8x8x3 latents; the transformer works on 1x1x1 patches of 8 channels.
LTX's own size check wants multiples of 32 pixels whatever its VAE.
"""

from __future__ import annotations

import torch

from diffserve.testing.components import perturb_, tiny_t5_encoder
from diffserve.testing.tokenizers import build_t5_tokenizer

LATENT_CHANNELS = 8


def _vae():
    from diffusers import AutoencoderKLLTXVideo

    levels = 4
    return AutoencoderKLLTXVideo(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8,) * levels,
        decoder_block_out_channels=(8,) * levels,
        layers_per_block=(1,) * (levels + 1),
        decoder_layers_per_block=(1,) * (levels + 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * (levels + 1),
        upsample_residual=(False,) * levels,
        upsample_factor=(1,) * levels,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()


def build_tiny_ltx_video(path: str, seed: int = 0) -> str:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(max_length=128)
    text_encoder = tiny_t5_encoder(tokenizer)
    transformer = LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=32,  # the T5 width
    )
    perturb_(transformer, 0.05, torch.Generator().manual_seed(seed + 1))
    vae = _vae()
    # At this width the decoder barely depends on its input; perturbed, it passes latent differences through.
    perturb_(vae, 0.1, torch.Generator().manual_seed(seed + 2))
    # LTX-Video 0.9's scheduler: resolution-dependent shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05, shift=1.0,
        use_dynamic_shifting=True,
    )
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer.eval())
    pipe.save_pretrained(path, safe_serialization=True)
    return path
