"""batching="step" on every native family but the demo model and FLUX (tests/engine/test_step_batching.py):
requests arrive staggered, with different step counts and CFG on and off, and each request's output
equals its output run alone (CPU, fp32, tiny random weights). Measured max-abs errors are noted per
test; "0" means bit-equal (the request ran its steps alone or its rows computed identically)."""

import pytest

from diffserve import Omni
from diffserve.engine.admission import admit
from diffserve.request import OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput
from diffserve.testing import output_tensor
from diffserve.testing.conformance import sample_image, wan_test_image
from tests.engine.test_step_batching import TOLERANCE, _run_staggered


def _request(engine, prompt, seed, steps, negative=None, image=None, **params):
    if "max_sequence_length" in engine.spec.params:  # the text encoders' cost grows with it
        params.setdefault("max_sequence_length", 16)
    sp = OmniDiffusionSamplingParams(num_inference_steps=steps, output_type="pt", **params)
    images = None if image is None else image if isinstance(image, list) else [image]
    prompts = [PromptInput(prompt, seed=seed, negative_prompt=negative, images=images)]
    return admit(engine.spec, OmniDiffusionRequest(prompts=prompts, sampling_params=sp))


def _assert_equal_alone(engine, requests, outputs) -> list:
    """Each request's step-batched output equals its output alone; the outputs alone."""
    errors, alone_outputs = [], []
    for req in requests:
        out = outputs[req.request_id]
        assert out.error is None, out.error
        alone = engine.run_batch([req])[0]  # the request-level path: pipeline.forward on this request only
        errors.append((output_tensor(out) - output_tensor(alone)).abs().max().item())
        alone_outputs.append(alone)
    assert max(errors) <= TOLERANCE, errors
    return alone_outputs


def _engine(path):
    return Omni(path, dtype="float32", device="cpu", batching="step", max_batch_size=4, disable_progress_bar=True)


def _calls(monkeypatch, engine) -> list[tuple]:
    """Record each denoiser call's batch size (and Wan's expert, SD3's skipped layers)."""
    pipeline = engine.executor.worker.pipeline
    calls, predict = [], pipeline.predict_noise

    def recording(**kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs.get("dit"), kwargs.get("skip_layers")))
        return predict(**kwargs)

    monkeypatch.setattr(pipeline, "predict_noise", recording)
    return calls


def _module_engine(arch):
    @pytest.fixture(scope="module")
    def engine(tiny_checkpoint):
        with _engine(tiny_checkpoint(arch)) as omni:
            yield omni.engine

    return engine


kontext = _module_engine("flux-kontext")
qwen = _module_engine("qwen-image")
qwen_edit = _module_engine("qwen-image-edit")
qwen_edit_plus = _module_engine("qwen-image-edit-plus")
sd3 = _module_engine("sd3.5-medium")
stable_audio = _module_engine("stable-audio")
wan21 = _module_engine("wan2.1-t2v")
wan21_i2v = _module_engine("wan2.1-i2v")
wan22 = _module_engine("wan2.2-t2v")
wan22_ti2v_i2v = _module_engine("wan2.2-ti2v-i2v")


def test_flux_kontext_edits_staggered_equal_alone(kontext):
    """Reference-image tokens per request; the true-CFG request runs after the others (another key).
    Measured: 9.5e-7, 7.2e-7, 0."""
    first, second = sample_image(32, 32, 0), sample_image(32, 32, 1)
    a = _request(kontext, "make it red", 1, steps=3, image=first, guidance_scale=2.5)
    b = _request(kontext, "add a hat", 2, steps=2, image=second, guidance_scale=4.0)
    cfg = _request(kontext, "a dog", 3, steps=2, image=second, negative="dark", true_cfg_scale=4.0)
    outputs, occupancy = _run_staggered(kontext, {0: [a, cfg], 1: [b]})
    assert occupancy == [1, 2, 2, 1, 1]
    _assert_equal_alone(kontext, [a, b, cfg], outputs)


def test_qwen_image_prompts_of_different_lengths_staggered_equal_alone(qwen):
    """Prompts of different lengths stepped together are padded to the longest and masked, with and
    without true CFG (norm-rescaled per request). Measured: 9.8e-7, 1.5e-6, 0."""
    short = _request(qwen, "a fox", 1, steps=3, negative="blurry", true_cfg_scale=4.0)
    long = _request(qwen, "a small blue car parked by the sea at night", 2, steps=2,
                    negative="low quality, dark, out of focus", true_cfg_scale=2.5)
    plain = _request(qwen, "a red fox in snow", 3, steps=2)
    outputs, occupancy = _run_staggered(qwen, {0: [short, plain], 1: [long]})
    assert occupancy == [1, 2, 2, 1, 1]
    _assert_equal_alone(qwen, [short, long, plain], outputs)


def test_qwen_image_edit_staggered_equal_alone(qwen_edit):
    """Reference-image tokens and vision prompts per request. Measured: 1.2e-6, 1.5e-6, 0."""
    first, second = sample_image(64, 48, 0), sample_image(64, 48, 1)
    a = _request(qwen_edit, "make the sky purple", 1, steps=3, image=first, negative="blurry", true_cfg_scale=3.0,
                 height=32, width=32)
    b = _request(qwen_edit, "add a small red boat on the water", 2, steps=2, image=second, negative="low quality",
                 true_cfg_scale=2.0, height=32, width=32)
    plain = _request(qwen_edit, "make it snow", 3, steps=2, image=second, height=32, width=32)
    outputs, occupancy = _run_staggered(qwen_edit, {0: [a, plain], 1: [b]})
    assert occupancy == [1, 2, 2, 1, 1]
    _assert_equal_alone(qwen_edit, [a, b, plain], outputs)


def test_qwen_image_edit_plus_two_images_staggered_equal_alone(qwen_edit_plus):
    """Two input images per prompt. Measured: 1.9e-6, 1.8e-6."""
    wide = [sample_image(64, 48, 0), sample_image(48, 64, 1)]
    other = [sample_image(64, 48, 2), sample_image(48, 64, 3)]
    a = _request(qwen_edit_plus, "the cat from picture 1 in picture 2", 1, steps=3, image=wide, negative="blurry",
                 true_cfg_scale=3.0, height=32, width=32)
    b = _request(qwen_edit_plus, "swap the colours", 2, steps=2, image=other, negative="low quality",
                 true_cfg_scale=4.0, height=32, width=32)
    outputs, occupancy = _run_staggered(qwen_edit_plus, {0: [a], 1: [b]})
    assert occupancy == [1, 2, 2]
    _assert_equal_alone(qwen_edit_plus, [a, b], outputs)


def test_sd3_skip_layer_guidance_steps_run_apart_equal_alone(sd3, monkeypatch):
    """Skip-layer guidance is per request: on a step where one request runs it, the requests are split
    into one call with it and one without. Measured: 4.8e-7, 5.4e-7, 0."""
    slg = _request(sd3, "a fox", 1, steps=4, guidance_scale=5.0, skip_guidance_layers=(1,),
                   skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.6)
    cfg = _request(sd3, "a blue car", 2, steps=3, guidance_scale=3.0)
    plain = _request(sd3, "a castle", 3, steps=2, guidance_scale=1.0)
    calls = _calls(monkeypatch, sd3)
    outputs, occupancy = _run_staggered(sd3, {0: [slg, plain], 1: [cfg]})
    # slg runs SLG at its steps 1 and 2 (0.8 < i < 2.4), while cfg has joined: those steps are two calls,
    # slg's (CFG-batched branches, then its skip-layer forward) and cfg's; its last step shares one call
    # with cfg. plain (no CFG: another key) runs last.
    assert calls == [(2, None, None), (2, None, None), (1, None, (1,)), (2, None, None), (2, None, None),
                     (1, None, (1,)), (2, None, None), (4, None, None), (1, None, None), (1, None, None)]
    assert occupancy == [1, 2, 2, 2, 1, 1]
    monkeypatch.undo()
    _assert_equal_alone(sd3, [slg, cfg, plain], outputs)


def test_stable_audio_staggered_own_schedules_and_windows_equal_alone(stable_audio):
    """Each request steps its own SDE scheduler (sigmas, Brownian noise) and conditions on its own audio
    window. Measured: 1.3e-6, 4.8e-7, 0."""
    a = _request(stable_audio, "rain on a roof", 1, steps=3, guidance_scale=7.0)
    b = _request(stable_audio, "a dog barking", 2, steps=2, guidance_scale=3.0, negative="music",
                 audio_start_in_s=0.25, audio_end_in_s=0.75)
    plain = _request(stable_audio, "birdsong", 3, steps=2, guidance_scale=1.0)
    outputs, occupancy = _run_staggered(stable_audio, {0: [a, plain], 1: [b]})
    assert occupancy == [1, 2, 2, 1, 1]
    _assert_equal_alone(stable_audio, [a, b, plain], outputs)


def test_wan21_staggered_equal_alone(wan21):
    """Measured: 9.5e-7, 9.8e-7, 0."""
    a = _request(wan21, "a cat surfing a wave", 1, steps=3, guidance_scale=5.0)
    b = _request(wan21, "a red car at night", 2, steps=2, guidance_scale=3.0, negative="blurry")
    plain = _request(wan21, "a dog running", 3, steps=2, guidance_scale=1.0)
    outputs, occupancy = _run_staggered(wan21, {0: [a, plain], 1: [b]})
    assert occupancy == [1, 2, 2, 1, 1]
    _assert_equal_alone(wan21, [a, b, plain], outputs)


def test_wan21_image_to_video_staggered_equal_alone(wan21_i2v):
    """CLIP image tokens and first-frame conditioning per request. Measured: 3.3e-7, 3.0e-7."""
    a = _request(wan21_i2v, "the cat starts to walk", 1, steps=3, image=wan_test_image(0), guidance_scale=5.0)
    b = _request(wan21_i2v, "waves roll in", 2, steps=2, image=wan_test_image(1), guidance_scale=3.0)
    outputs, occupancy = _run_staggered(wan21_i2v, {0: [a], 1: [b]})
    assert occupancy == [1, 2, 2]
    _assert_equal_alone(wan21_i2v, [a, b], outputs)


def test_wan22_experts_per_request_equal_alone(wan22, monkeypatch):
    """Each request's expert follows its own timestep: a step where they differ calls each expert on
    its requests. With 4 steps the timesteps are 999, 900, 750, 500 (transformer_2 from 875 down);
    with 2, 999 and 750. Measured: 7.2e-7, 1.0e-6."""
    a = _request(wan22, "a cat surfing a wave", 1, steps=4, guidance_scale=4.0, guidance_scale_2=2.5)
    b = _request(wan22, "a red car at night", 2, steps=2, guidance_scale=3.0, guidance_scale_2=1.5)
    calls = _calls(monkeypatch, wan22)
    outputs, occupancy = _run_staggered(wan22, {0: [a], 2: [b]})
    assert occupancy == [1, 1, 2, 2]
    assert [(n, dit) for n, dit, _ in calls] == [(2, "transformer"), (2, "transformer"), (2, "transformer_2"),
                                                  (2, "transformer"), (4, "transformer_2")]
    monkeypatch.undo()
    _assert_equal_alone(wan22, [a, b], outputs)


def test_wan22_ti2v_image_to_video_per_token_timesteps_equal_alone(wan22_ti2v_i2v):
    """TI2V-5B: per-token timesteps (the image's first latent frame at 0). Measured: 0, 0, 0 (its
    transformer's rows compute alike at any batch size, as in its conformance case)."""
    a = _request(wan22_ti2v_i2v, "the cat starts to walk", 1, steps=3, image=wan_test_image(0), guidance_scale=5.0)
    b = _request(wan22_ti2v_i2v, "waves roll in", 2, steps=2, image=wan_test_image(1), guidance_scale=3.0)
    plain = _request(wan22_ti2v_i2v, "a bird flies away", 3, steps=2, image=wan_test_image(2), guidance_scale=1.0)
    outputs, occupancy = _run_staggered(wan22_ti2v_i2v, {0: [a, plain], 1: [b]})
    assert occupancy == [1, 2, 2, 1, 1]
    _assert_equal_alone(wan22_ti2v_i2v, [a, b, plain], outputs)


@pytest.fixture(scope="module")
def wan22_tea_cache(tiny_checkpoint):
    with Omni(tiny_checkpoint("wan2.2-t2v"), dtype="float32", device="cpu", batching="step", max_batch_size=4,
              cache_backend="tea_cache", cache_config={"warmup_steps": 1, "rel_l1_thresh": 0.3},
              disable_progress_bar=True) as omni:
        yield omni.engine


def test_wan22_step_cache_with_experts_split_equal_alone(wan22_tea_cache, monkeypatch):
    """A step cache sees each expert's call with the rows of that call's requests only, so each request
    skips the steps it skips alone (here 2 and 1 steps). Measured: 7.5e-7, 1.7e-6."""
    a = _request(wan22_tea_cache, "a cat surfing a wave", 1, steps=6, guidance_scale=4.0)
    b = _request(wan22_tea_cache, "a red car at night", 2, steps=4, guidance_scale=3.0)
    calls = _calls(monkeypatch, wan22_tea_cache)
    outputs, _ = _run_staggered(wan22_tea_cache, {0: [a], 2: [b]})
    # a runs transformer_2 from its third step, b from its third: two steps call each expert apart.
    assert [(n, dit) for n, dit, _ in calls] == [
        (2, "transformer"), (2, "transformer"), (2, "transformer_2"), (2, "transformer"), (2, "transformer_2"),
        (2, "transformer"), (4, "transformer_2"), (4, "transformer_2"),
    ]
    monkeypatch.undo()
    for req, alone in zip((a, b), _assert_equal_alone(wan22_tea_cache, [a, b], outputs)):
        assert outputs[req.request_id].metrics["cached_steps"] == alone.metrics["cached_steps"] > 0
