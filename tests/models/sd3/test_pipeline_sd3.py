"""StableDiffusion3Pipeline: skip-layer guidance (its window, its effect, its limits at admission and
under CFG parallel), dynamic shifting against diffusers, and what the spec declares. (Equality with
diffusers on the conformance scenarios, SLG included, is the conformance suite's job.)"""

import json
import shutil

import pytest
import torch

from diffserve import Omni
from diffserve.models.sd3.pipeline_sd3 import SkipLayerGuidance
from diffserve.request import OmniDiffusionSamplingParams
from diffserve.testing import load_pipeline, pipeline_request
from diffserve.testing.conformance import ConformanceScenario, run_sd3_reference


@pytest.fixture(scope="module")
def sd35_medium(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint("sd3.5-medium"))


def params(**kw) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(**{"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 5.0,
                                          "max_sequence_length": 11, "output_type": "pt", "seed": 0, **kw})


def generate(pipeline, **kw):
    return pipeline(pipeline_request(pipeline, ["a lighthouse at dusk"], params(**kw)))


def test_default_window_is_steps_1_to_5_of_28():
    slg = SkipLayerGuidance(layers=(7, 8, 9), scale=2.8, start=0.01, stop=0.2)
    assert [i for i, active in enumerate(slg.active_steps(28)) if active] == [1, 2, 3, 4, 5]
    assert not any(slg.active_steps(4))  # 0.04 < i < 0.8: none


def _count_skip_layer_calls(pipeline):
    calls = []
    handle = pipeline.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs.get("skip_layers")), with_kwargs=True
    )
    return calls, handle


def test_skip_layer_guidance_runs_on_its_window_steps_and_changes_the_output(sd35_medium):
    plain = generate(sd35_medium).output
    calls, handle = _count_skip_layer_calls(sd35_medium)
    try:
        # 4 steps, window (0.04, 2.4): steps 1 and 2 make one extra call each, with the blocks skipped.
        guided = generate(sd35_medium, skip_guidance_layers=[1], skip_layer_guidance_scale=2.0,
                          skip_layer_guidance_stop=0.6)
    finally:
        handle.remove()
    assert calls == [None, None, (1,), None, (1,), None]
    assert guided.metrics["skip_layer_guidance_steps"] == 2
    # Measured max-abs change 0.13 on the tiny model: SLG is not a no-op.
    assert (guided.output - plain).abs().max().item() > 1e-2


def test_skip_layer_guidance_outside_its_window_is_plain_cfg(sd35_medium):
    plain = generate(sd35_medium).output
    # Default window (0.01, 0.2) of 4 steps holds no step, as in diffusers.
    unused = generate(sd35_medium, skip_guidance_layers=[1])
    assert unused.metrics["skip_layer_guidance_steps"] == 0
    assert torch.equal(unused.output, plain)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"skip_guidance_layers": [1], "guidance_scale": 1.0},
         r"skip_guidance_layers is used only with classifier-free guidance \(guidance_scale > 1\)"),
        ({"skip_layer_guidance_scale": 3.0}, "skip_layer_guidance_scale is used only together with skip_guidance_layers"),
        ({"skip_layer_guidance_stop": 0.5}, "skip_layer_guidance_stop is used only together with skip_guidance_layers"),
        ({"skip_guidance_layers": [0, 3]},
         r"skip_guidance_layers=\[0, 3\] is out of range: StableDiffusion3Pipeline takes indices 0 to 2"),
        # The tiny position table covers 24 patches of 2x2 latent pixels, VAE factor 2: 96 pixels.
        ({"height": 128}, "height=128 is not supported by StableDiffusion3Pipeline: it must be a multiple of 4 between 4 "
                          "and 96"),
    ],
)
def test_admission_refuses_what_would_be_ignored_or_fail(sd35_medium, kw, message):
    with pytest.raises(ValueError, match=message):
        pipeline_request(sd35_medium, ["a cat"], params(**kw))


def test_spec_declares_diffusers_defaults(sd35_medium):
    # The pipeline's own declaration; the tiny checkpoint then runs 4 steps (its model_index.json).
    spec = sd35_medium.sampling_spec()
    assert spec.cfg == "guidance"
    assert {k: spec.defaults[k] for k in ("num_inference_steps", "guidance_scale", "max_sequence_length")} == {
        "num_inference_steps": 28, "guidance_scale": 7.0, "max_sequence_length": 256}
    # sample_size 16 latent pixels x VAE factor 2 (the released models: 128 x 8 = 1024).
    assert (spec.defaults["height"], spec.defaults["width"]) == (32, 32)
    assert "skip_guidance_layers" not in spec.defaults  # it turns SLG on, so it has no default
    assert sd35_medium.spec.defaults["num_inference_steps"] == 4


def test_step_cache_refuses_skip_layer_guidance_but_runs_plain_cfg(tiny_checkpoint):
    with Omni(tiny_checkpoint("sd3"), dtype="float32", device="cpu", cache_backend="tea_cache",
              disable_progress_bar=True) as omni:
        with pytest.raises(ValueError, match=r"skip_guidance_layers cannot be used here: skip-layer guidance makes an "
                                             r"extra transformer call on some steps, which the step cache "
                                             r"\(cache_backend='tea_cache'\) cannot follow"):
            omni.generate("a cat", params(skip_guidance_layers=[1]))
        assert omni.generate("a cat", params())[0].images.shape == (1, 3, 32, 32)


def test_skip_layer_guidance_under_cfg_parallel_matches_single_process(tiny_checkpoint):
    """Each CFG rank makes the skip-layer prediction itself after the branches are exchanged.
    Measured max-abs difference to one process: 1.3e-6 (sd3.5-medium, 2 prompts)."""
    path = tiny_checkpoint("sd3.5-medium")
    prompts = [{"prompt": "a lighthouse at dusk", "negative_prompt": "low quality", "seed": 3},
               {"prompt": "a bowl of fruit", "seed": 4}]
    sp = params(skip_guidance_layers=[1], skip_layer_guidance_stop=0.6, seed=None)
    results = []
    for parallel in ({}, {"cfg_parallel_size": 2}):
        with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True, max_batch_size=2, **parallel) as omni:
            outputs = omni.generate(prompts, sp)
        assert outputs[0].metrics["skip_layer_guidance_steps"] == 2
        results.append(torch.cat([out.images for out in outputs]))
    assert (results[1] - results[0]).abs().max().item() <= 1e-4


def test_dynamic_shifting_matches_diffusers(tiny_checkpoint, tmp_path):
    """A scheduler config with use_dynamic_shifting: the shift mu follows the image token count, as in
    diffusers. Measured max-abs difference: 0.0."""
    path = str(tmp_path / "sd3-dynamic")
    shutil.copytree(tiny_checkpoint("sd3"), path)
    config_path = f"{path}/scheduler/scheduler_config.json"
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "use_dynamic_shifting": True}, f)
    scenario = ConformanceScenario("dynamic_shift", ["a red fox in snow"], params(height=32, width=48, seed=None),
                                   seeds=[0])
    with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        ours = omni.generate({"prompt": "a red fox in snow", "seed": 0}, scenario.params)[0].images
    assert (ours - run_sd3_reference(path, scenario)).abs().max().item() <= 1e-4
    # Not the static schedule: mu changed the timesteps.
    dynamic, static = load_pipeline(path), load_pipeline(tiny_checkpoint("sd3"))
    assert not torch.allclose(dynamic.prepare_timesteps(4, 32, 48), static.prepare_timesteps(4, 32, 48))
