"""The tiny Stable Audio checkpoint is a real diffusers StableAudioPipeline folder: diffusers' own
pipeline generates from it (the future reference for our pipeline), seeded runs repeat exactly."""

import json
import os

import pytest
import torch
from diffusers import StableAudioPipeline

from diffserve.testing.stable_audio import SCHEDULER_CONFIG

# torchsde warns when diffusers' scheduler asks for Brownian increments at its interval ends (sigma_min
# rounded in float32, and the final sigma 0): expected, and the same in every diffusers run.
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    pipe = StableAudioPipeline.from_pretrained(tiny_checkpoint("stable-audio"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts, seeds, **kwargs):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=2, generator=generators, **kwargs).audios


def test_checkpoint_is_small_with_the_real_scheduler(tiny_checkpoint):
    folder = tiny_checkpoint("stable-audio")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert size < 2e6
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    assert scheduler["_class_name"] == "CosineDPMSolverMultistepScheduler"
    assert {k: scheduler[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG


def test_diffusers_pipeline_generates_one_second_with_cfg(pipe):
    prompts = ["a hammer hitting wood", "rain on a tin roof"]
    audio = generate(pipe, prompts, [0, 1], negative_prompt=["low quality", "noise"], guidance_scale=7.0)
    # 15 latent frames x hop 4 = 60 stereo samples at 60 Hz: the model's whole 1 s.
    assert audio.shape == (2, 2, 60)
    assert torch.isfinite(audio).all() and audio.abs().mean() > 1e-3
    # Seeded runs repeat exactly: initial noise and the SDE scheduler's Brownian noise both follow the seeds.
    again = generate(pipe, prompts, [0, 1], negative_prompt=["low quality", "noise"], guidance_scale=7.0)
    assert torch.equal(audio, again)
    assert not torch.equal(audio[0], audio[1])


def test_diffusers_pipeline_crops_to_the_requested_seconds(pipe):
    audio = generate(pipe, ["a dog barking"], [0], audio_start_in_s=0.25, audio_end_in_s=0.9, guidance_scale=1.0)
    assert audio.shape == (1, 2, int(0.9 * 60) - int(0.25 * 60))

