"""Stable Audio Open: text-to-audio with a latent DiT over Oobleck VAE frames."""

from diffserve.models.stable_audio.stable_audio_transformer import StableAudioDiTConfig, StableAudioDiTModel

__all__ = ["StableAudioDiTConfig", "StableAudioDiTModel"]
