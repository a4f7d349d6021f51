"""StableAudioPipeline on the tiny checkpoint (1 s at 60 Hz, stereo): what it takes, what it returns for
each output_type, and the SDE noise it feeds its scheduler. Equality with diffusers is
tests/models/test_conformance.py (case "stable-audio")."""

import numpy as np
import pytest
import torch
from diffusers import CosineDPMSolverMultistepScheduler

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.models.stable_audio.pipeline_stable_audio import brownian_noise
from diffserve.testing.stable_audio import SCHEDULER_CONFIG

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")


@pytest.fixture(scope="module")
def omni(tiny_checkpoint):
    with Omni(tiny_checkpoint("stable-audio"), dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        yield omni


def params(**kw):
    return OmniDiffusionSamplingParams(**{"num_inference_steps": 2, "seed": 0, **kw})


def test_spec_declares_the_audio_params_and_the_models_window(omni):
    spec = omni.engine.spec
    assert spec.modality == "audio" and spec.cfg == "guidance"
    assert spec.params == {"audio_start_in_s", "audio_end_in_s", "num_inference_steps", "guidance_scale"}
    # 15 latent frames x hop 4 / 60 Hz; diffusers' defaults for the rest but the tiny checkpoint's 4 steps
    # (model_index.json _diffserve_defaults; the pipeline's own is diffusers' 100).
    assert spec.max_audio_seconds == 1.0 and spec.fixed_tokens == 16
    assert spec.defaults == {"audio_start_in_s": 0.0, "audio_end_in_s": 1.0, "num_inference_steps": 4,
                             "guidance_scale": 7.0}
    assert omni.engine.executor.worker.pipeline.sampling_spec().defaults["num_inference_steps"] == 100


def test_default_output_is_one_float32_array_per_clip_with_its_sample_rate(omni):
    (out,) = omni.generate("a drum loop", params(num_outputs_per_prompt=2))
    assert out.sample_rate == 60 and out.metrics["sample_rate"] == 60
    assert isinstance(out.audio, list) and len(out.audio) == 2
    for clip in out.audio:
        assert isinstance(clip, np.ndarray) and clip.dtype == np.float32 and clip.shape == (2, 60)
    assert not np.array_equal(out.audio[0], out.audio[1])


def test_output_types_and_cropping(omni):
    window = dict(audio_start_in_s=0.25, audio_end_in_s=0.75)
    (pt,) = omni.generate("rain", params(output_type="pt", **window))
    assert isinstance(pt.audio, torch.Tensor) and pt.audio.dtype == torch.float32 and pt.audio.shape == (1, 2, 30)
    (np_out,) = omni.generate("rain", params(output_type="np", **window))
    assert np.array_equal(np_out.audio[0], pt.audio[0].numpy())
    (latent,) = omni.generate("rain", params(output_type="latent"))
    assert latent.audio.shape == (1, 6, 15)


def test_requests_the_model_cannot_run_are_refused(omni):
    with pytest.raises(ValueError, match=r"audio_end_in_s=1.5 is beyond StableAudioPipeline's longest clip of 1 s"):
        omni.generate("rain", params(audio_end_in_s=1.5))
    with pytest.raises(ValueError, match="audio_start_in_s=0.5 must be less than audio_end_in_s=0.5"):
        omni.generate("rain", params(audio_start_in_s=0.5, audio_end_in_s=0.5))
    with pytest.raises(ValueError, match="height=32 is not used by StableAudioPipeline"):
        omni.generate("rain", params(height=32))
    with pytest.raises(ValueError, match="negative_prompt is not used when guidance_scale=1.0"):
        omni.generate({"prompt": "rain", "negative_prompt": "hum"}, params(guidance_scale=1.0))
    (out,) = omni.generate("rain", params())  # the engine keeps serving
    assert out.audio[0].shape == (2, 60)


def test_brownian_noise_gives_each_prompt_its_own_tree():
    """A batch's noise is its prompts' noise stacked: prompt i alone draws the same, and its k outputs
    share one tree (as diffusers with one generator for a prompt's k waveforms)."""
    scheduler = CosineDPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(4)  # sigmas 500, 42.2, 3.56, 0.3, 0
    batch = brownian_noise([3, 4], 2, (6, 15), scheduler.sigmas, 0.3, 500.0)
    assert batch.shape == (4, 4, 6, 15) and batch.dtype == torch.float32
    assert torch.equal(batch[:, 2:], brownian_noise([4], 2, (6, 15), scheduler.sigmas, 0.3, 500.0))
    assert not torch.equal(batch[:, 0], batch[:, 1]) and not torch.equal(batch[:, 0], batch[:, 2])
    # Unit-variance increments (the sampler divides by sqrt(|d sigma|)); the step to sigma 0 lies outside
    # the tree's [sigma_min, sigma_max] and gets none (the solver gives it no weight either).
    for step in batch[:3]:
        assert 0.9 < step.std().item() < 1.1
    assert not batch[3].any()
