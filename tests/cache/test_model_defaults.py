"""Each model's declared step-cache defaults (`_cache_defaults`) load, are checked, and are what the
engine runs with when the user gives no cache_config; the user's keys still win."""

import pytest
import torch

from diffserve import Omni
from diffserve.cache import CacheDiTConfig, TeaCacheConfig
from diffserve.cache.config import resolve_for


def _demo_transformer():
    from diffserve.models.demo_dit.configs import DemoDiTConfig
    from diffserve.models.demo_dit.demo_dit_transformer import DemoDiTTransformer2DModel

    with torch.device("meta"):
        return DemoDiTTransformer2DModel(DemoDiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32))


def _flux_transformer():
    from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig

    with torch.device("meta"):
        return FluxTransformer2DModel(FluxTransformerConfig(num_layers=1, num_single_layers=1))


def test_flux_defaults():
    tea = resolve_for(TeaCacheConfig(), _flux_transformer())
    assert (tea.rel_l1_thresh, tea.warmup_steps, tea.calibrator) == (0.25, 1, "none")
    assert resolve_for(CacheDiTConfig(), _flux_transformer()) == resolve_for(CacheDiTConfig(), object())  # built-in


def test_demo_model_defaults():
    tea = resolve_for(TeaCacheConfig(), _demo_transformer())
    assert (tea.rel_l1_thresh, tea.warmup_steps, tea.max_continuous_cached_steps, tea.calibrator) == (
        0.1, 6, 3, "taylorseer")
    dit = resolve_for(CacheDiTConfig(), _demo_transformer())
    assert dit.strify() == "DBCache_F1B0_W6_M-1_MC3_R0.4_T1O1"


def _native_transformers():
    """One transformer of every native family, on the meta device (only declarations are read)."""
    from diffserve.models.qwen_image.qwen_image_transformer import QwenImageTransformer2DModel
    from diffserve.models.sd3.sd3_transformer import SD3Transformer2DModel
    from diffserve.models.stable_audio.stable_audio_transformer import StableAudioDiTModel
    from diffserve.models.wan.wan_transformer import WanTransformer3DModel, WanTransformerConfig

    with torch.device("meta"):
        return [_demo_transformer(), _flux_transformer(), SD3Transformer2DModel(), QwenImageTransformer2DModel(),
                StableAudioDiTModel(),
                WanTransformer3DModel(WanTransformerConfig(num_attention_heads=12, ffn_dim=8960, num_layers=2))]


@pytest.mark.parametrize("backend", ["tea_cache", "cache_dit"])
def test_every_native_family_resolves_to_complete_settings(backend):
    """Declared defaults are valid; families without a declaration (SD3, Qwen-Image, Stable Audio) get
    the built-in ones."""
    config = {"tea_cache": TeaCacheConfig(), "cache_dit": CacheDiTConfig()}[backend]
    for transformer in _native_transformers():
        resolved = resolve_for(config, transformer)
        assert resolved.is_resolved()
        if not getattr(transformer, "_cache_defaults", None):
            assert resolved == config.with_defaults({}), type(transformer).__name__


def test_the_engine_runs_with_the_models_defaults_unless_the_user_sets_a_key(tiny_checkpoint):
    path = tiny_checkpoint("demo-dit")
    with Omni(path, dtype="float32", device="cpu", cache_backend="tea_cache") as omni:
        (hook,) = omni.engine.executor.worker.cache_backend.hooks
        assert (hook.rel_l1_thresh, hook.warmup_steps, hook.max_continuous_cached_steps, hook.forecast_order) == (
            0.1, 6, 3, 1)
    with Omni(path, dtype="float32", device="cpu", cache_backend="tea_cache",
              cache_config={"warmup_steps": 2, "calibrator": "none"}) as omni:
        (hook,) = omni.engine.executor.worker.cache_backend.hooks
        assert (hook.rel_l1_thresh, hook.warmup_steps, hook.forecast_order) == (0.1, 2, 0)
    with Omni(path, dtype="float32", device="cpu", cache_backend="cache_dit",
              cache_config={"residual_diff_threshold": 0.3}) as omni:
        transformer = omni.engine.executor.worker.pipeline.transformer
        context = transformer._context_manager.get_context(transformer._context_names[0])
        config = context.cache_config
        assert (config.max_warmup_steps, config.max_continuous_cached_steps, config.residual_diff_threshold) == (
            6, 3, 0.3)
        assert context.calibrator_config.calibrator_type == "taylorseer"
