"""Fitting TeaCache coefficients: the recorder sees every step pair, the fit recovers a polynomial."""

import numpy as np
import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.cache.teacache.fit import ChangeRecorder, fit_coefficients


def test_fit_recovers_a_known_polynomial():
    x = np.linspace(0.05, 0.3, 50)
    y = 2.0 * x**2 - 0.1 * x + 0.01
    coefficients = fit_coefficients(list(zip(x, y)), degree=2)
    np.testing.assert_allclose(coefficients, (2.0, -0.1, 0.01), atol=1e-9)
    with pytest.raises(ValueError, match="need more than 4"):
        fit_coefficients([(0.1, 0.1)] * 3)


def test_recorder_collects_one_pair_per_step_after_the_first(tiny_flux):
    with Omni(tiny_flux, dtype="float32", device="cpu") as omni:
        transformer = omni.engine.executor.worker.pipeline.transformer
        recorder = ChangeRecorder(transformer)
        for seed in (0, 1):
            recorder.new_request()
            omni.generate("a fox", OmniDiffusionSamplingParams(height=16, width=16, num_inference_steps=5, seed=seed,
                                                               max_sequence_length=8))
        recorder.remove()
    assert len(recorder.pairs) == 2 * 4  # 4 consecutive-step pairs per 5-step request
    x, y = np.asarray(recorder.pairs).T
    assert (x > 0).all() and (y > 0).all()


def test_recorder_needs_a_declared_signal():
    with pytest.raises(ValueError, match="declares no _teacache_modulated_input"):
        ChangeRecorder(torch.nn.Linear(2, 2))
