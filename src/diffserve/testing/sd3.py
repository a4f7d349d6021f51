"""Tiny random-weight Stable Diffusion 3 / 3.5 checkpoints in the exact diffusers layout.

`build_tiny_sd3(path, seed, variant)` writes a StableDiffusion3Pipeline folder: two CLIP text
encoders with projection, a T5 encoder, their tokenizers, a 16-channel AutoencoderKL with SD3's
shift/scaling factors, SD3's flow-matching scheduler and the transformer of one variant:

- "sd3.5-large": per-head RMS q/k norm (SD3.5-large and large-turbo);
- "sd3.5-medium": q/k norm plus dual attention (a second image self-attention) in the first blocks;
- "sd3-medium": no q/k norm (SD3).

Dimensions follow the real wiring: the CLIP hidden states (concatenated) are zero-padded to the T5
width, which is the transformer's `joint_attention_dim`; the pooled CLIP embeddings (concatenated)
give `pooled_projection_dim`.
"""

from __future__ import annotations

import torch

from diffserve.testing.components import perturb_, tiny_clip_text_model, tiny_t5_encoder
from diffserve.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

HEADS, HEAD_DIM = 2, 16
CLIP_DIMS = (16, 24)  # hidden size = projection size of text_encoder / text_encoder_2
T5_DIM = 48  # > sum(CLIP_DIMS), so the pipeline's zero padding of the CLIP states is exercised
NUM_LAYERS = 3
# transformer kwargs per variant
VARIANTS = {
    "sd3.5-large": dict(qk_norm="rms_norm"),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd3-medium": dict(qk_norm=None),
}


def _clip_text_encoder(tokenizer, dim: int):
    from transformers import CLIPTextModelWithProjection

    return tiny_clip_text_model(tokenizer, CLIPTextModelWithProjection, hidden_size=dim, projection_dim=dim)


def _vae():
    from diffusers import AutoencoderKL

    # SD3's VAE: 16 latent channels, no quant convs, latents normalized as (z - 0.0609) * 1.5305.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.0609,
        scaling_factor=1.5305,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _transformer(variant: str, seed: int):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=NUM_LAYERS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=sum(CLIP_DIMS),
        out_channels=16,
        pos_embed_max_size=24,  # larger than the test grids, so the centre crop is exercised
        **VARIANTS[variant],
    )
    # adaLN-Zero starts every gate at zero; noise makes each parameter matter.
    perturb_(transformer, 0.05, torch.Generator().manual_seed(seed + 1))
    return transformer.eval()


def build_tiny_sd3(path: str, seed: int = 0, variant: str = "sd3.5-large") -> str:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    if variant not in VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; available: {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=_transformer(variant, seed),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(),
        text_encoder=_clip_text_encoder(clip_tokenizer, CLIP_DIMS[0]),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip_text_encoder(clip_tokenizer, CLIP_DIMS[1]),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny_t5_encoder(t5_tokenizer, d_model=T5_DIM),
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
