"""Tiny random-weight AudioLDM2 checkpoints in the exact diffusers layout (served through the diffusers
adapter: diffserve has no native AudioLDM2 pipeline).

AudioLDM2 conditions a spectrogram UNet on two sequences: T5's text embeddings, and a GPT-2's hidden
states generated from CLAP's and T5's projected embeddings. The vocoder turns 8-bin mel frames into 4
samples each at 100 Hz, so the default clip (32 latent rows x the VAE's 2x = 64 frames) is 2.56 s of
256 mono samples.
"""

from __future__ import annotations

import torch

from diffserve.testing.components import perturb_, tiny_autoencoder_kl, tiny_t5_encoder
from diffserve.testing.tokenizers import build_roberta_tokenizer, build_t5_tokenizer

CLAP_DIM, T5_DIM, GPT2_DIM, MEL_BINS = 16, 32, 24, 8


def _clap(tokenizer):
    from transformers import ClapConfig, ClapModel

    text = dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=80, projection_dim=CLAP_DIM, pad_token_id=1,
                bos_token_id=0, eos_token_id=2)
    audio = dict(spec_size=32, window_size=4, num_mel_bins=16, patch_embeds_hidden_size=8, hidden_size=16,
                 depths=[1, 1], num_attention_heads=[2, 2], projection_dim=CLAP_DIM, patch_stride=(4, 4),
                 enable_fusion=False)
    return ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=CLAP_DIM)).eval()


def _language_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=GPT2_DIM, n_layer=2, n_head=2, n_positions=64, vocab_size=64, n_inner=37)
    config.max_new_tokens = 4  # AudioLDM2 reads the number of generated embeddings from the config
    return GPT2LMHeadModel(config).eval()


def _vocoder(seed: int):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=MEL_BINS, sampling_rate=100, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    ))
    # HiFi-GAN's initial weights (std 0.01) make near-silence (max |sample| ~1e-6); perturbed, a tiny
    # model's waveforms reach about 0.2 std, so differences between outputs show.
    perturb_(vocoder, 0.2, torch.Generator().manual_seed(seed + 2))
    return vocoder.eval()


def build_tiny_audioldm2(path: str, seed: int = 0) -> str:
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, DDIMScheduler
    from transformers import ClapFeatureExtractor

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_roberta_tokenizer(), build_t5_tokenizer(max_length=32)
    unet = AudioLDM2UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=(2, 4),
        # As the real model: self-attention, then cross-attention to GPT-2's states, then to T5's.
        cross_attention_dim=([None, GPT2_DIM, T5_DIM], [None, GPT2_DIM, T5_DIM]),
    )
    perturb_(unet, 0.05, torch.Generator().manual_seed(seed + 1))
    vae = tiny_autoencoder_kl(in_channels=1, out_channels=1)
    pipe = AudioLDM2Pipeline(
        vae=vae,
        text_encoder=_clap(tokenizer),
        text_encoder_2=tiny_t5_encoder(tokenizer_2),
        projection_model=AudioLDM2ProjectionModel(CLAP_DIM, T5_DIM, GPT2_DIM),
        language_model=_language_model(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        # Used only to rank several waveforms of a prompt by CLAP score (needs librosa).
        feature_extractor=ClapFeatureExtractor(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False),
        vocoder=_vocoder(seed),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
