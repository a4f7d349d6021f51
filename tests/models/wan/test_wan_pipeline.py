"""Wan pipelines: input validation, the Wan2.2 expert switch, declared components and outputs.
(Equality with diffusers, batched and per prompt, is the conformance suite's job.)"""

import numpy as np
import pytest

from diffserve.models.interface import discover_components
from diffserve.models.outputs import video_post_process
from diffserve.request import OmniDiffusionRequest, OmniDiffusionSamplingParams
from diffserve.testing import load_pipeline, pipeline_request
from diffserve.testing.conformance import wan_test_image


@pytest.fixture(scope="module")
def wan21(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint("wan2.1-t2v"))


@pytest.fixture(scope="module")
def wan22(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint("wan2.2-t2v"))


@pytest.fixture(scope="module")
def wan21_i2v(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint("wan2.1-i2v"))


def request(pipeline, prompts, **params) -> OmniDiffusionRequest:
    """A request admitted against the pipeline's spec (as the engine hands it to the pipeline)."""
    sp = OmniDiffusionSamplingParams(**{"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 2,
                                        "max_sequence_length": 16, **params})
    return pipeline_request(pipeline, prompts, sp)


@pytest.mark.parametrize("num_frames", [2, 4, 80])
def test_num_frames_must_be_4k_plus_1(wan21, num_frames):
    with pytest.raises(ValueError, match=rf"num_frames={num_frames} is not supported by WanPipeline: it must be 4k\+1"):
        request(wan21, ["a cat"], num_frames=num_frames)


@pytest.mark.parametrize("field, value", [("height", 40), ("width", 8)])
def test_size_must_be_a_multiple_of_16(wan21, field, value):
    with pytest.raises(ValueError, match=rf"{field}={value} is not supported by WanPipeline: it must be a multiple of 16"):
        request(wan21, ["a cat"], **{field: value})


def test_image_inputs_follow_the_checkpoint(wan21, wan21_i2v):
    with pytest.raises(ValueError, match="WanPipeline takes no input images"):
        request(wan21, [{"prompt": "a cat", "image": wan_test_image(0)}])
    with pytest.raises(ValueError, match="WanImageToVideoPipeline needs an input image with every prompt"):
        request(wan21_i2v, [{"prompt": "a cat", "image": wan_test_image(0)}, "no image"])


def _record_calls(pipeline, names):
    """[(expert name, timestep)] for every transformer forward."""
    calls = []
    handles = [
        getattr(pipeline, name).register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: calls.append((name, float(kwargs["timestep"][0]))), with_kwargs=True
        )
        for name in names
    ]
    return calls, handles


def test_wan22_switches_expert_and_guidance_at_the_boundary(wan22, monkeypatch):
    scales = []
    original = type(wan22).combine_cfg_noise
    monkeypatch.setattr(type(wan22), "combine_cfg_noise",
                        lambda self, pos, neg, scale: scales.append(scale) or original(self, pos, neg, scale))
    calls, handles = _record_calls(wan22, ["transformer", "transformer_2"])
    try:
        wan22(request(wan22, ["a cat"], num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.5,
                      output_type="latent"))
    finally:
        for h in handles:
            h.remove()
    # UniPC with flow_shift 3: timesteps 999, 900, 750, 500; boundary_ratio 0.875 -> t = 875.
    # Both CFG branches run as one batched call per step.
    assert calls == [("transformer", 999.0), ("transformer", 900.0), ("transformer_2", 750.0), ("transformer_2", 500.0)]
    assert scales == [4.0, 4.0, 2.5, 2.5]


def test_wan21_runs_one_expert(wan21):
    calls, handles = _record_calls(wan21, ["transformer"])
    try:
        wan21(request(wan21, ["a cat"], num_inference_steps=3, guidance_scale=1.0, output_type="latent"))
    finally:
        for h in handles:
            h.remove()
    assert [name for name, _ in calls] == ["transformer"] * 3


def test_declared_components(wan21, wan22, wan21_i2v, tiny_checkpoint):
    assert list(discover_components(wan22)["dit"]) == ["transformer", "transformer_2"]
    assert list(discover_components(wan21)["dit"]) == ["transformer"]
    assert list(discover_components(wan21_i2v)["encoder"]) == ["text_encoder", "image_encoder"]
    assert list(discover_components(load_pipeline(tiny_checkpoint("wan2.2-i2v")))["encoder"]) == ["text_encoder"]
    assert [s.prefix for s in wan22.weights_sources] == ["transformer.", "transformer_2."]


def test_video_output_is_uint8_frames_per_video(wan21):
    out = wan21(request(wan21, ["a cat", "a dog"], fps=12, guidance_scale=1.0, num_inference_steps=1))
    assert out.metrics["fps"] == 12 and out.metrics["num_frames"] == 5
    frames = video_post_process(out, "pil").frames
    assert len(frames) == 2
    assert all(f.dtype == np.uint8 and f.shape == (5, 32, 48, 3) for f in frames)
