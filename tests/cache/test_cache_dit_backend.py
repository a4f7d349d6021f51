"""The cache-dit backend's extension point (CUSTOM_DIT_ENABLERS) and its failure handling."""

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.cache import CacheDiTConfig
from diffserve.cache.cache_dit_backend import CUSTOM_DIT_ENABLERS, CacheDiTBackend, enable_cache_for_dit
from diffserve.testing import load_pipeline, pipeline_request

PERMISSIVE = CacheDiTConfig(max_warmup_steps=1, max_continuous_cached_steps=-1, residual_diff_threshold=0.9)


def _params(steps: int) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(
        height=32, width=32, num_inference_steps=steps, max_sequence_length=8, output_type="pt"
    )


def _run(pipeline, steps: int) -> torch.Tensor:
    req = pipeline_request(pipeline, {"prompt": "a fox", "seed": 0}, _params(steps))
    with torch.inference_mode():
        return pipeline(req).output


def test_a_registered_enabler_replaces_the_default_and_is_refreshed_per_request(tiny_flux, monkeypatch):
    refreshed = []

    def enable_for_test(pipeline, config):
        refresh = enable_cache_for_dit(pipeline, config)

        def refresh_and_record(pipeline, num_inference_steps):
            refreshed.append(num_inference_steps)
            refresh(pipeline, num_inference_steps)

        return refresh_and_record

    monkeypatch.setitem(CUSTOM_DIT_ENABLERS, "FluxPipeline", enable_for_test)
    with Omni(tiny_flux, dtype="float32", device="cpu", cache_backend="cache_dit", cache_config=PERMISSIVE) as omni:
        outputs = [omni.generate({"prompt": "a fox", "seed": 0}, _params(steps))[0] for steps in (4, 3)]
    assert refreshed == [4, 3]
    assert [out.metrics["cached_steps"] for out in outputs] == [3, 2]


def test_a_failed_enable_leaves_the_pipeline_uncached(tiny_flux, monkeypatch):
    pipeline = load_pipeline(tiny_flux)
    expected = _run(pipeline, 4)

    def enable_then_fail(pipeline, config):
        enable_cache_for_dit(pipeline, config)
        raise RuntimeError("enabler failed after installing cache-dit")

    monkeypatch.setitem(CUSTOM_DIT_ENABLERS, "FluxPipeline", enable_then_fail)
    with pytest.raises(RuntimeError, match="enabler failed"):
        CacheDiTBackend(PERMISSIVE).enable(pipeline)
    transformer = pipeline.transformer
    assert "forward" not in transformer.__dict__ and not hasattr(transformer, "_context_manager")
    assert torch.equal(_run(pipeline, 4), expected)

    # A later enable starts clean and caches.
    monkeypatch.delitem(CUSTOM_DIT_ENABLERS, "FluxPipeline")
    backend = CacheDiTBackend(PERMISSIVE)
    assert not backend.is_enabled()
    backend.enable(pipeline)
    assert backend.is_enabled()
    backend.refresh(pipeline, 4)
    _run(pipeline, 4)
    assert backend.cached_steps() == 3
    backend.disable(pipeline)
    assert not backend.is_enabled()
    assert torch.equal(_run(pipeline, 4), expected)


def test_compute_blocks_must_leave_a_block_to_skip(tiny_flux):
    pipeline = load_pipeline(tiny_flux)
    with pytest.raises(ValueError, match=r"Fn_compute_blocks \(2\) \+ Bn_compute_blocks \(0\) must be below the 2 "
                                         r"blocks of transformer.transformer_blocks"):
        CacheDiTBackend(CacheDiTConfig(Fn_compute_blocks=2)).enable(pipeline)
    assert "forward" not in pipeline.transformer.__dict__
