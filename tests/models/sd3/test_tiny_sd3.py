"""The tiny SD3 checkpoints are complete StableDiffusion3Pipeline folders that diffusers runs."""

import os

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

ARCHS = ["sd3", "sd3.5-medium", "sd3-medium"]


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_pipeline_generates_from_the_tiny_checkpoint(tiny_checkpoint, arch):
    """The future conformance reference: a 2-step generation with CFG, on CPU."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_checkpoint(arch))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a red fox in the snow",
        negative_prompt="blurry",
        num_inference_steps=2,
        height=32,
        width=48,
        guidance_scale=4.5,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (1, 3, 32, 48)
    assert torch.isfinite(images).all() and images.std() > 0.01


def test_checkpoint_has_every_sd3_component_with_sd3_settings(tiny_checkpoint):
    folder = tiny_checkpoint("sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    assert type(pipe.text_encoder).__name__ == type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.shift_factor, vae.scaling_factor) == (16, 0.0609, 1.5305)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    transformer = pipe.transformer.config
    assert transformer.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert transformer.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert size < 3 * 2**20


def test_unknown_variant_is_an_error(tmp_path):
    from diffserve.testing.sd3 import build_tiny_sd3

    with pytest.raises(ValueError, match="unknown SD3 variant 'sd4'; available: sd3.5-large"):
        build_tiny_sd3(str(tmp_path), variant="sd4")


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path):
    from diffserve.testing import make_tiny_checkpoint

    def weight_bytes(path, component):
        files = [f for f in sorted(os.listdir(os.path.join(path, component))) if f.endswith(".safetensors")]
        return [open(os.path.join(path, component, f), "rb").read() for f in files]

    a, b, c = (make_tiny_checkpoint("sd3.5-medium", str(tmp_path / n), seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert weight_bytes(a, component) == weight_bytes(b, component) != weight_bytes(c, component), component
