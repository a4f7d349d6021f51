"""Tiny random-weight Wan2.1 / Wan2.2 checkpoints in the exact diffusers layout.

- `build_tiny_wan_t2v`: WanPipeline; `dual=True` gives Wan2.2 A14B's two experts (`transformer` for
  high noise, `transformer_2` for low noise, switched at `boundary_ratio`); `ti2v=True` gives Wan2.2
  TI2V-5B (48-channel VAE with 16x spatial compression, per-token timesteps).
- `build_tiny_wan_i2v`: WanImageToVideoPipeline; Wan2.1 with a CLIP vision encoder and image
  cross-attention, or (`dual=True`) Wan2.2 I2V-A14B, conditioned on the image latents only.
"""

from __future__ import annotations

import torch

from diffserve.testing.components import perturb_, tiny_t5_encoder
from diffserve.testing.tokenizers import build_t5_tokenizer

HEADS, HEAD_DIM = 2, 12  # head_dim 12 -> RoPE widths (frame, row, col) = (4, 4, 4)
TEXT_DIM = 32
WAN21_VAE_CHANNELS = 16
WAN22_VAE_CHANNELS = 48


def _text_encoder(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    return tiny_t5_encoder(tokenizer, UMT5EncoderModel, UMT5Config, d_model=TEXT_DIM)


def _vae(ti2v: bool):
    from diffusers import AutoencoderKLWan

    if not ti2v:
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=WAN21_VAE_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        # At this width the initial decoder barely depends on its input (two unrelated latents
        # decode to videos differing by ~0.01); perturbed, it passes latent differences through.
        perturb_(vae, 0.1, torch.Generator().manual_seed(4321))
        return vae
    # Wan2.2's VAE: residual blocks, 2x2 pixel patchify in front, 16x spatial compression overall.
    g = torch.Generator().manual_seed(1234)
    return AutoencoderKLWan(
        base_dim=4, decoder_base_dim=8, z_dim=WAN22_VAE_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=(torch.randn(WAN22_VAE_CHANNELS, generator=g) * 0.3).tolist(),
        latents_std=(torch.rand(WAN22_VAE_CHANNELS, generator=g) + 0.8).tolist(),
    )


def _transformer(in_channels: int, out_channels: int, seed: int, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TEXT_DIM,
        freq_dim=32,  # the released models use 256; smaller keeps the replicated embedders a smaller share
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
        added_kv_proj_dim=HEADS * HEAD_DIM if image_dim is not None else None,
    )
    perturb_(transformer, 0.05, torch.Generator().manual_seed(seed + 1))
    return transformer.eval()


def wan_scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    # The scheduler the released Wan checkpoints ship with.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


def build_tiny_wan_t2v(path: str, seed: int = 0, dual: bool = False, ti2v: bool = False) -> str:
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    channels = WAN22_VAE_CHANNELS if ti2v else WAN21_VAE_CHANNELS
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(tokenizer),
        vae=_vae(ti2v),
        scheduler=wan_scheduler(flow_shift=5.0 if ti2v else 3.0),
        transformer=_transformer(channels, channels, seed + 10),
        transformer_2=_transformer(channels, channels, seed + 20) if dual else None,
        boundary_ratio=0.875 if dual else None,
        expand_timesteps=ti2v,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _clip_vision():
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # 32x32 images in 8x8 patches: 16 patch tokens + the class token.
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16, intermediate_size=24, projection_dim=16, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        )
    ).eval()
    processor = CLIPImageProcessor(
        crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}, do_center_crop=True, do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return encoder, processor


def build_tiny_wan_i2v(path: str, seed: int = 0, dual: bool = False, ti2v: bool = False) -> str:
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    if ti2v:  # the image is the first latent frame; no mask channels, no CLIP
        in_channels = out_channels = WAN22_VAE_CHANNELS
    else:  # noise + 4 mask channels (one per VAE temporal frame) + the encoded condition video
        in_channels, out_channels = 2 * WAN21_VAE_CHANNELS + 4, WAN21_VAE_CHANNELS
    # Wan2.1 I2V has a CLIP image encoder and image cross-attention; Wan2.2 (A14B, TI2V) has neither.
    with_clip = not dual and not ti2v
    image_encoder, image_processor = _clip_vision() if with_clip else (None, None)
    image_dim = image_encoder.config.hidden_size if with_clip else None
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(tokenizer),
        vae=_vae(ti2v),
        scheduler=wan_scheduler(flow_shift=5.0 if ti2v else 3.0),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=_transformer(in_channels, out_channels, seed + 10, image_dim=image_dim),
        transformer_2=_transformer(in_channels, out_channels, seed + 20) if dual else None,
        boundary_ratio=0.9 if dual else None,
        expand_timesteps=ti2v,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
