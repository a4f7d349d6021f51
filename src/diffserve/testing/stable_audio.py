"""Tiny random-weight Stable Audio Open checkpoints in the exact diffusers layout.

Sizes: 15 latent frames of 6 channels, a VAE hop of 4 samples at 60 Hz, so the longest generation is
exactly 1 s (60 stereo samples) and the DiT sees 16 tokens (frames + the global token), which divides
by 2 and 4 for sequence-parallel runs. The DiT keeps the real model's shape of grouped-query
cross-attention (4 query heads, 2 key/value heads) and a text projection that is the identity (T5
width = conditioning width), with a cross-attention width of its own so swapped dims cannot pass.
"""

from __future__ import annotations

import torch

from diffserve.testing.components import perturb_, tiny_t5_encoder
from diffserve.testing.tokenizers import build_t5_tokenizer

# stabilityai/stable-audio-open-1.0 scheduler/scheduler_config.json.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_data": 1.0,
    "sigma_max": 500.0,
    "sigma_min": 0.3,
    "sigma_schedule": "exponential",
    "solver_order": 2,
    "solver_type": "midpoint",
    "final_sigmas_type": "zero",
    "euler_at_final": False,
    "lower_order_final": True,
    "rho": 7.0,
}
# Seconds conditioning range of the real projection model (min_val/max_val of its number conditioners).
SECONDS_RANGE = (0, 512)


def build_tiny_stable_audio(path: str, seed: int = 0) -> str:
    # The scheduler's SDE noise needs torchsde (pip install torchsde).
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
        StableAudioProjectionModel,
    )
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(max_length=32)
    text_encoder = tiny_t5_encoder(tokenizer)
    projection_model = StableAudioProjectionModel(
        text_encoder_dim=32, conditioning_dim=32, min_value=SECONDS_RANGE[0], max_value=SECONDS_RANGE[1]
    )
    transformer = StableAudioDiTModel(
        sample_size=15,
        in_channels=6,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        num_key_value_attention_heads=2,
        out_channels=6,
        cross_attention_dim=24,
        time_proj_dim=16,
        global_states_input_dim=64,  # seconds start + seconds total, 32 each
        cross_attention_input_dim=32,
    )
    perturb_(transformer, 0.05, torch.Generator().manual_seed(seed + 1))
    vae = AutoencoderOobleck(
        encoder_hidden_size=4,
        downsampling_ratios=[2, 2],
        channel_multiples=[1, 2],
        decoder_channels=4,
        decoder_input_channels=6,
        audio_channels=2,
        sampling_rate=60,
    )
    scheduler = CosineDPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    pipe = StableAudioPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        projection_model=projection_model.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        scheduler=scheduler,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
