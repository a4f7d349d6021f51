"""FLUX.1 Kontext: how input images and the output are sized, what a request may ask, and which
requests share a batch. (Equality with diffusers is the conformance suite's job; its tiny scenarios
keep each image's own size, so the choice of a Kontext size is tested here.)"""

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.engine.admission import batch_key
from diffserve.engine.cost import latent_tokens
from diffserve.models.flux.pipeline_flux_kontext import KONTEXT_SIZES
from diffserve.testing import load_pipeline, pipeline_request
from diffserve.testing.conformance import sample_image


@pytest.fixture(scope="module")
def kontext(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint("flux-kontext"))


def request(pipeline, prompts, **params):
    sp = OmniDiffusionSamplingParams(**{"num_inference_steps": 2, "max_sequence_length": 16, **params})
    return pipeline_request(pipeline, prompts, sp)


def edit(size, prompt="make it red"):
    return {"prompt": prompt, "image": sample_image(*size, seed=0)}


def test_kontext_sizes_are_the_reference_ones():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert KONTEXT_SIZES == tuple(PREFERRED_KONTEXT_RESOLUTIONS)


def test_defaults_are_kontext_ones(kontext):
    declared = kontext.sampling_spec()
    # Tiny VAE (factor 2): default side 256, so max_area 256**2 (1024**2 with the real factor 8).
    assert declared.defaults == {"height": 256, "width": 256, "num_inference_steps": 28, "guidance_scale": 2.5,
                                 "max_sequence_length": 512, "max_area": 256 * 256, "auto_resize": True}
    assert declared.cfg == "true_cfg" and declared.images.max_per_prompt == 1
    # The tiny checkpoint runs small by default: its images keep their own size.
    defaults = kontext.spec.defaults
    assert (defaults["max_area"], defaults["auto_resize"], defaults["num_inference_steps"]) == (32 * 32, False, 4)


@pytest.mark.parametrize(
    "size, auto_resize, used",
    [
        ((1000, 700), True, (1248, 832)),  # 1.43:1 is nearer 3:2 than 1.35:1
        ((700, 1000), True, (832, 1248)),
        ((300, 300), True, (1024, 1024)),
        ((4000, 1000), True, (1568, 672)),  # wider than any: the widest
        ((50, 35), False, (48, 32)),  # own size, rounded down to the tiny VAE's multiple of 4
    ],
)
def test_input_image_is_used_at_the_nearest_kontext_size(kontext, size, auto_resize, used):
    req = request(kontext, edit(size), height=32, width=32, auto_resize=auto_resize)
    assert kontext.spec.input_image_size(size, req.sampling_params) == used


def test_reference_image_is_encoded_at_the_kontext_size(kontext, monkeypatch):
    """The pipeline resizes to the size the spec (and so the batch key) names; the encoding itself runs
    at 48x32, since the tiny VAE's spatial attention at 1248x832 takes minutes on a CPU."""
    sizes = []
    preprocess = kontext.image_processor.preprocess

    def record_size(images, height, width):
        sizes.append((width, height))
        return preprocess(images, height=32, width=48)

    monkeypatch.setattr(kontext.image_processor, "preprocess", record_size)
    req = request(kontext, edit((1000, 700)), height=32, width=32, auto_resize=True)
    latents, ids = kontext.prepare_reference_latents([req.prompts[0].images[0]], 2, req.sampling_params)
    assert sizes == [(1248, 832)]
    tokens = (48 // 4) * (32 // 4)  # VAE factor 2, then 2x2 packing
    assert latents.shape == (2, tokens, 16) and ids.shape == (tokens, 3)
    assert torch.equal(ids[:, 0], torch.ones(tokens)) and ids[:, 1].max() == 32 // 4 - 1


def test_output_keeps_the_image_aspect_ratio_at_max_area(kontext):
    sp = request(kontext, edit((1000, 700)), max_area=256 * 256).sampling_params
    # sqrt(65536 * 1000/700) = 306.0 -> 304, sqrt(65536 * 700/1000) = 214.2 -> 212 (multiples of 4).
    assert (sp.width, sp.height) == (304, 212)
    sp = request(kontext, edit((1000, 700))).sampling_params  # the tiny checkpoint's max_area, 32 * 32
    assert (sp.width, sp.height) == (36, 24)
    sp = request(kontext, edit((1000, 700)), max_area=1200).sampling_params
    assert (sp.width, sp.height) == (40, 28)
    sp = request(kontext, edit((1000, 700)), height=64, width=32).sampling_params
    assert (sp.width, sp.height) == (32, 64)


@pytest.mark.parametrize(
    "prompts, params, message",
    [
        (edit((48, 32)), {"height": 32, "max_area": 1024}, "give it or height and width, not both"),
        ("a fox", {"max_area": 1024}, "max_area is used only with an input image"),
        ("a fox", {"auto_resize": False}, "auto_resize is used only with an input image"),
        (edit((48, 32)), {"strength": 0.5}, "strength=0.5 is not used by FluxKontextPipeline"),
        ({"prompt": "a", "images": [sample_image(48, 32, 0)] * 2}, {}, "takes at most 1 input image"),
        ([edit((48, 32)), edit((32, 48))], {"height": 32, "width": 32, "auto_resize": False},
         r"uses the input images of this request at different sizes \[\(\(32, 48\),\), \(\(48, 32\),\)\]"),
        (edit((3, 40)), {"height": 32, "width": 32, "auto_resize": False}, "would be used at 0x40"),
    ],
)
def test_invalid_requests_are_refused(kontext, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        request(kontext, prompts, **params)


def test_images_used_at_one_size_share_a_batch_key(kontext):
    def key(size, auto_resize=True):
        return batch_key(kontext.spec, request(kontext, edit(size), height=32, width=32, auto_resize=auto_resize))

    assert key((1000, 700)) == key((1200, 800))  # both 1248x832
    assert key((1000, 700)) != key((800, 800))
    assert key((1000, 700), auto_resize=False) != key((1200, 800), auto_resize=False)
    assert key((50, 35), auto_resize=False) == key((48, 32), auto_resize=False)


def test_images_used_at_different_sizes_run_apart_as_they_run_alone(tiny_checkpoint):
    sp = OmniDiffusionSamplingParams(height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                                     auto_resize=False, output_type="pt")
    prompts = [{**edit((48, 32), "a"), "seed": 0}, {**edit((32, 48), "b"), "seed": 1}]
    with Omni(tiny_checkpoint("flux-kontext"), dtype="float32", device="cpu", max_batch_size=2) as omni:
        together = omni.generate(prompts, sp)
        alone = [omni.generate(p, sp)[0] for p in prompts]
    assert [out.metrics["batch_size"] for out in together] == [1, 1]
    for a, b in zip(together, alone):
        assert torch.equal(a.images, b.images)


def test_rgba_and_greyscale_images_are_edited_as_rgb(kontext):
    rgb = sample_image(48, 32, 0)
    sp = request(kontext, edit((48, 32)), height=32, width=32, auto_resize=False).sampling_params
    expected, _ = kontext.prepare_reference_latents([rgb], 1, sp)
    rgba, _ = kontext.prepare_reference_latents([rgb.convert("RGBA")], 1, sp)
    assert torch.equal(rgba, expected)
    grey, _ = kontext.prepare_reference_latents([rgb.convert("L")], 1, sp)
    assert grey.shape == expected.shape


def test_the_work_estimate_counts_the_reference_tokens(kontext):
    req = request(kontext, edit((1000, 700)), height=512, width=512, auto_resize=True)
    # Output 512x512 and reference 1248x832, one token per 4x4 pixels (VAE factor 2, 2x2 packing).
    assert latent_tokens(kontext.spec, req) == 128 * 128 + 312 * 208
    assert latent_tokens(kontext.spec, request(kontext, "a fox", height=512, width=512)) == 128 * 128
