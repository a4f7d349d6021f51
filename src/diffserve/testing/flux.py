"""Tiny random-weight FLUX.1 checkpoints in the exact diffusers layout."""

from __future__ import annotations

import torch

from diffserve.testing.components import perturb_, tiny_autoencoder_kl, tiny_clip_text_model, tiny_t5_encoder
from diffserve.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = ["build_tiny_flux", "perturb_"]


def build_tiny_flux(path: str, seed: int = 0, guidance_embeds: bool = True, pipeline: str = "FluxPipeline") -> str:
    """`pipeline`: the diffusers class saved (model_index.json's _class_name): FluxPipeline, or
    FluxKontextPipeline (FLUX.1 Kontext has the same components)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    perturb_(transformer, 0.05, torch.Generator().manual_seed(seed + 1))
    text_encoder = tiny_clip_text_model(clip_tokenizer)
    text_encoder_2 = tiny_t5_encoder(t5_tokenizer)
    vae = tiny_autoencoder_kl(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                              use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0 if guidance_embeds else 1.0,
        use_dynamic_shifting=guidance_embeds,
    )
    pipe = getattr(diffusers, pipeline)(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
