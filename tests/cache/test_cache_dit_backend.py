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


def test_taylorseer_is_accepted_and_changes_only_the_skipped_steps(tiny_flux):
    """cache-dit's TaylorSeer forecasts the skipped blocks' residual from the computed steps instead of
    reusing the last one: the same steps are skipped, the output changes. cache-dit forms the first
    derivative only on a computed step from the fourth on (its calibrator starts counting one step late
    in a fresh context and differentiates from its step 2), hence 4 warm-up steps."""
    pipeline = load_pipeline(tiny_flux)
    outputs, cached = {}, {}
    for calibrator in ("none", "taylorseer"):
        config = CacheDiTConfig(max_warmup_steps=4, max_continuous_cached_steps=-1, residual_diff_threshold=0.9,
                                calibrator=calibrator)
        backend = CacheDiTBackend(config)
        backend.enable(pipeline)
        backend.refresh(pipeline, 7)
        outputs[calibrator] = _run(pipeline, 7)
        cached[calibrator] = backend.cached_steps()
        backend.disable(pipeline)
    assert cached["taylorseer"] == cached["none"] >= 2  # of the 3 steps after warm-up
    rel = ((outputs["taylorseer"] - outputs["none"]).norm() / outputs["none"].norm()).item()
    assert rel > 1e-3, rel  # measured: 1.7e-2


def test_taylorseer_with_threshold_zero_equals_uncached(tiny_flux):
    pipeline = load_pipeline(tiny_flux)
    expected = _run(pipeline, 5)
    backend = CacheDiTBackend(CacheDiTConfig(residual_diff_threshold=0.0, calibrator="taylorseer", taylorseer_order=2))
    backend.enable(pipeline)
    backend.refresh(pipeline, 5)
    assert torch.equal(_run(pipeline, 5), expected)
    assert backend.cached_steps() == 0


def test_each_denoiser_gets_its_own_declared_defaults(tiny_checkpoint):
    """Wan2.2's two experts resolve the user's config against their own `_cache_defaults`; when they
    differ, each expert's contexts carry its own (cache-dit ParamsModifiers)."""
    pipeline = load_pipeline(tiny_checkpoint("wan2.2-t2v"))
    expert = type(pipeline.transformer_2)
    pipeline.transformer_2.__class__ = type(  # this expert alone declares other defaults
        "ExpertWithOwnDefaults", (expert,),
        {"_cache_defaults": {"cache_dit": {"residual_diff_threshold": 0.5, "max_warmup_steps": 2}}},
    )
    backend = CacheDiTBackend(CacheDiTConfig(max_continuous_cached_steps=5))
    backend.enable(pipeline)
    try:
        def context_config(transformer):
            manager = transformer._context_manager
            return manager.get_context(transformer._context_names[0]).cache_config

        first, second = context_config(pipeline.transformer), context_config(pipeline.transformer_2)
        def settings(config):
            return config.residual_diff_threshold, config.max_warmup_steps, config.max_continuous_cached_steps

        assert (settings(first), settings(second)) == ((0.24, 4, 5), (0.5, 2, 5))
        backend.refresh(pipeline, 4)  # refreshed contexts keep their own settings
        assert context_config(pipeline.transformer_2).residual_diff_threshold == 0.5
    finally:
        backend.disable(pipeline)
