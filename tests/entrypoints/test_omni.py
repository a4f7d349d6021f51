import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams


def params(**kw):
    base = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8, output_type="pt")
    return OmniDiffusionSamplingParams(**{**base, **kw})


def test_unknown_keyword_is_named(tiny_flux):
    with pytest.raises(TypeError, match="'tensor_paralell_size'"):
        Omni(tiny_flux, tensor_paralell_size=2)


def test_a_feature_combination_that_cannot_work_is_refused_not_ignored(tiny_flux):
    with pytest.raises(ValueError, match="CPU offload cannot be combined with use_hsdp"):
        Omni(tiny_flux, enable_cpu_offload=True, use_hsdp=True, hsdp_shard_size=2)


def test_batched_prompts_equal_one_by_one(flux_omni):
    prompts = [{"prompt": "a red fox", "seed": 1}, {"prompt": "a blue car", "seed": 2}, {"prompt": "sky", "seed": 3}]
    batched = flux_omni.generate(prompts, params())
    assert [o.metrics["batch_size"] for o in batched] == [3, 3, 3]
    for prompt, out in zip(prompts, batched):
        alone = flux_omni.generate(prompt, params())[0]
        assert alone.metrics["batch_size"] == 1
        # Batched matmuls may reorder float sums; 1e-5 is far below any visible difference.
        torch.testing.assert_close(out.images, alone.images, atol=1e-5, rtol=0)
        assert (out.prompt, out.seed) == (prompt["prompt"], prompt["seed"])


def test_incompatible_requests_are_not_merged(flux_omni):
    outs = flux_omni.generate(["a", "b"], [params(seed=0), params(seed=0, height=16)])
    assert [o.metrics["batch_size"] for o in outs] == [1, 1]
    assert outs[0].images.shape[-2:] == (32, 32) and outs[1].images.shape[-2:] == (16, 32)


def test_seed_reproduces_and_unseeded_reports_its_seed(flux_omni):
    a = flux_omni.generate("a fox", params(seed=42))[0]
    b = flux_omni.generate("a fox", params(seed=42))[0]
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    drawn = flux_omni.generate("a fox", params())[0]
    assert isinstance(drawn.seed, int)
    again = flux_omni.generate("a fox", params(seed=drawn.seed))[0]
    torch.testing.assert_close(drawn.images, again.images, rtol=0, atol=0)


def test_output_types(flux_omni):
    pil = flux_omni.generate("a fox", params(seed=0, output_type="pil"))[0].images
    arr = flux_omni.generate("a fox", params(seed=0, output_type="np"))[0].images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    assert arr.shape == (1, 32, 32, 3) and arr.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    latent = flux_omni.generate("a fox", params(seed=0, output_type="latent"))[0].images
    assert latent.shape == (1, 64, 16)  # (32/4)^2 packed tokens of 4 channels x 2x2


def test_default_size_comes_from_the_model(flux_omni):
    out = flux_omni.generate("a fox", OmniDiffusionSamplingParams(num_inference_steps=1, seed=0, max_sequence_length=8))
    assert out[0].images[0].size == (32, 32)  # the tiny checkpoint's own default (make-tiny writes it)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"height": 30}, "height=30 is not supported by FluxPipeline: it must be a multiple of 4"),
        ({"width": 8192}, "width=8192 is not supported"),
        ({"max_sequence_length": 1000}, "exceeds the text encoder's limit of 512 tokens"),
    ],
)
def test_invalid_request_raises_value_error(flux_omni, kw, message):
    with pytest.raises(ValueError, match=message):
        flux_omni.generate("a fox", params(**kw))


def test_sampling_params_count_must_match(flux_omni):
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        flux_omni.generate(["a", "b", "c"], [params(), params()])


def test_stage_metrics_are_reported(flux_omni):
    metrics = flux_omni.generate("a fox", params(seed=0))[0].metrics
    for key in ("encode_s", "denoise_s", "decode_s", "pipeline_s", "e2e_s"):
        assert metrics[key] > 0


def test_progress_callback_sees_every_step(flux_omni):
    from diffserve.request import OmniDiffusionRequest, PromptInput

    sp = params(seed=0, num_inference_steps=3)
    req = OmniDiffusionRequest(prompts=[PromptInput.from_user("a fox", sp)], sampling_params=sp)
    seen = []
    (out,) = flux_omni.engine.run_batch([flux_omni.engine.admit(req)], progress=lambda done, total: seen.append((done, total)))
    assert out.error is None and seen == [(1, 3), (2, 3), (3, 3)]


def test_progress_callback_can_abort(flux_omni):
    from diffserve.engine.engine import RequestAborted
    from diffserve.request import OmniDiffusionRequest, PromptInput

    sp = params(seed=0, num_inference_steps=50)
    req = OmniDiffusionRequest(prompts=[PromptInput.from_user("a fox", sp)], sampling_params=sp)
    seen = []

    def stop_after_two(done, total):
        seen.append(done)
        if done == 2:
            raise RequestAborted("client went away")

    (out,) = flux_omni.engine.run_batch([flux_omni.engine.admit(req)], progress=stop_after_two)
    assert out.error_type == "aborted" and seen == [1, 2]
    assert flux_omni.generate("a fox", params(seed=0))[0].images is not None  # the engine goes on


def test_profiler_writes_a_trace(tiny_flux, tmp_path):
    with Omni(tiny_flux, dtype="float32", device="cpu") as omni:
        omni.start_profile(str(tmp_path))
        with pytest.raises(RuntimeError, match="already running"):
            omni.start_profile(str(tmp_path))
        omni.generate("a fox", params(seed=0))
        traces = omni.stop_profile()
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
    assert "FluxTransformer2DModel" in open(traces[0]).read() or "aten::" in open(traces[0]).read()


def test_closed_omni_refuses_work(tiny_flux):
    with Omni(tiny_flux, dtype="float32", device="cpu") as omni:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        omni.generate("a fox", params())


@pytest.mark.parametrize("disable", [False, True])
def test_progress_bar_can_be_turned_off(tiny_flux, capfd, disable):
    with Omni(tiny_flux, dtype="float32", device="cpu", disable_progress_bar=disable) as omni:
        capfd.readouterr()
        omni.generate("a fox", params(seed=0, num_inference_steps=3))
    err = capfd.readouterr().err
    assert ("denoise" in err) is (not disable)
