"""Batching is exact: a prompt gives the same output alone and batched, and only requests that would
compute the same shapes and numerics share a pipeline call."""

import numpy as np
import pytest

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.testing.conformance import sample_image

STEPS = OmniDiffusionSamplingParams(num_inference_steps=3, max_sequence_length=8)


@pytest.fixture(scope="module")
def flux(tiny_flux):
    with Omni(tiny_flux, dtype="float32", device="cpu", max_batch_size=4, disable_progress_bar=True) as omni:
        yield omni


def _edit(image, seed):
    return {"prompt": "a red fox", "image": image, "seed": seed}


def test_image_to_image_with_two_input_sizes_equals_each_alone(flux):
    """No size given: each output takes its own input's size, so the two must not share a batch."""
    small, large = sample_image(48, 32, 0), sample_image(64, 48, 1)
    together = flux.generate([_edit(small, 1), _edit(large, 2)], STEPS)
    alone = [flux.generate(_edit(small, 1), STEPS)[0], flux.generate(_edit(large, 2), STEPS)[0]]
    assert [out.images[0].size for out in together] == [(48, 32), (64, 48)]
    assert [out.metrics["batch_size"] for out in together] == [1, 1]
    for batched, single in zip(together, alone):
        np.testing.assert_array_equal(np.asarray(batched.images[0]), np.asarray(single.images[0]))


def test_inputs_resized_to_one_output_size_share_a_batch(flux):
    """With an explicit size every input is resized to it (FLUX's rule), so the sizes may differ.
    Batched and alone differ by float32 rounding only (measured max-abs 8.9e-7; tolerance 1e-5)."""
    params = OmniDiffusionSamplingParams(num_inference_steps=3, max_sequence_length=8, height=32, width=32,
                                         output_type="pt")
    images = [sample_image(48, 32, 0), sample_image(64, 48, 1)]
    together = flux.generate([_edit(images[0], 1), _edit(images[1], 2)], params)
    assert [out.metrics["batch_size"] for out in together] == [2, 2]
    for out, image, seed in zip(together, images, (1, 2)):
        single = flux.generate(_edit(image, seed), params)[0]
        assert (out.images - single.images).abs().max().item() <= 1e-5


def test_defaults_and_explicit_values_batch_together(flux):
    """Keys are built from resolved parameters: leaving a value at its default equals giving it."""
    default_size = flux.engine.spec.defaults["height"]
    params = [STEPS, OmniDiffusionSamplingParams(num_inference_steps=3, max_sequence_length=8,
                                                 height=default_size, width=default_size)]
    outputs = flux.generate(["a fox", "a car"], params)
    assert [out.metrics["batch_size"] for out in outputs] == [2, 2]
