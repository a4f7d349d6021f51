"""TeaCache on Wan 2.1 / 2.2 (T2V and I2V, both Wan2.2 experts): which published coefficients and
settings each checkpoint gets, the timestep-modulation signal, and on tiny checkpoints that threshold
0 gives the uncached output exactly while a high threshold skips every step after the warm-up but
the last."""

import dataclasses

import pytest
import torch

from diffserve.cache import TeaCacheConfig
from diffserve.cache.config import resolve_for
from diffserve.cache.teacache import TeaCacheBackend
from diffserve.models.wan import wan_transformer
from diffserve.models.wan.wan_transformer import (
    WAN_TEACACHE,
    WanTI2VTransformer3DModel,
    WanTransformer3DModel,
    WanTransformerConfig,
)
from diffserve.testing import CONFORMANCE_CASES, load_pipeline, pipeline_request

# The transformer configs of the published checkpoints (diffusers' transformer/config.json), built on
# the meta device: only their declarations are read.
WAN21_T2V_1_3B = dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)
WAN21_T2V_14B = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN21_I2V_14B = dict(WAN21_T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
WAN22_I2V_A14B = dict(WAN21_T2V_14B, in_channels=36)
WAN21_FLF2V_14B = dict(WAN21_I2V_14B, pos_embed_seq_len=514)
WAN22_TI2V_5B = dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48)


def _meta(cls=WanTransformer3DModel, **config):
    with torch.device("meta"):
        return cls(WanTransformerConfig(**config))


@pytest.mark.parametrize(
    "cls, config, key, threshold",
    [
        (WanTransformer3DModel, WAN21_T2V_1_3B, ("t2v", 1536), 0.05),
        (WanTransformer3DModel, WAN21_T2V_14B, ("t2v", 5120), 0.1),  # also each Wan2.2-T2V-A14B expert
        (WanTransformer3DModel, WAN21_I2V_14B, ("i2v", 5120), 0.2),
        (WanTransformer3DModel, WAN22_I2V_A14B, ("i2v", 5120), 0.2),
    ],
    ids=["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.2-i2v-a14b"],
)
def test_each_checkpoint_gets_the_published_coefficients_and_settings(cls, config, key, threshold):
    transformer = _meta(cls, **config)
    assert transformer._teacache_coefficients == WAN_TEACACHE[key]["coefficients"]
    resolved = resolve_for(TeaCacheConfig(), transformer)
    # The authors' "use_ret_steps" variant: the first 5 steps always run.
    assert (resolved.rel_l1_thresh, resolved.warmup_steps) == (threshold, 5)
    # The user's values win.
    assert resolve_for(TeaCacheConfig(rel_l1_thresh=0.3, warmup_steps=2), transformer).rel_l1_thresh == 0.3


@pytest.mark.parametrize(
    "cls, config", [(WanTI2VTransformer3DModel, WAN22_TI2V_5B), (WanTransformer3DModel, WAN21_FLF2V_14B)],
    ids=["wan2.2-ti2v-5b", "wan2.1-flf2v-14b"],
)
def test_checkpoints_without_published_coefficients_run_uncalibrated_on_builtin_defaults(cls, config):
    transformer = _meta(cls, **config)
    assert transformer._teacache_coefficients is None
    assert resolve_for(TeaCacheConfig(), transformer) == TeaCacheConfig(**TeaCacheConfig.BUILTIN_DEFAULTS)


def test_the_signal_is_the_timestep_modulation_in_float32():
    """What every block receives as `temb` ([B, T, 6, D], "e0"), whatever the hidden states are."""
    modulation = torch.randn(2, 1, 6, 8, dtype=torch.bfloat16)
    signal = WanTransformer3DModel._teacache_modulated_input(None, torch.randn(2, 5, 8), torch.randn(2, 3, 8),
                                                              modulation, (None, None), None)
    assert signal.dtype == torch.float32 and torch.equal(signal, modulation.float())


def _request(arch: str, steps: int):
    case = next(c for c in CONFORMANCE_CASES if c.arch == arch)
    scenario = case.scenario(case.parallel_scenario)  # CFG on, 2 prompts in one batch
    prompts = [{**(p if isinstance(p, dict) else {"prompt": p}), "seed": s}
               for p, s in zip(scenario.prompts, scenario.seeds)]
    return prompts, dataclasses.replace(scenario.params, num_inference_steps=steps, output_type="pt")


def _generate(pipeline, arch: str, steps: int) -> torch.Tensor:
    prompts, params = _request(arch, steps)
    with torch.inference_mode():
        return pipeline(pipeline_request(pipeline, prompts, params)).output


def _block_calls(pipeline) -> dict[str, list[int]]:
    calls = {}
    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipeline, name, None)
        if transformer is not None:
            calls[name] = count = [0]
            transformer.blocks[0].register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
    return calls


@pytest.fixture
def published_settings_on_tiny_wan(monkeypatch):
    """Give the tiny checkpoints' (mode, width) the Wan2.1-T2V-1.3B entry, so their declared defaults
    are what a real checkpoint runs with: the published coefficients, 5 warm-up steps."""
    def key(config):
        return ("t2v", 1536)

    monkeypatch.setattr(wan_transformer, "wan_teacache_key", key)


# Wan2.2 I2V covers the image-to-video pipeline and both experts (Wan2.1 I2V only adds its CLIP encoder).
@pytest.mark.parametrize("arch", ["wan2.1-t2v", "wan2.2-t2v", "wan2.2-i2v"])
def test_threshold_zero_equals_the_uncached_output(tiny_checkpoint, published_settings_on_tiny_wan, arch):
    pipeline = load_pipeline(tiny_checkpoint(arch))
    expected = _generate(pipeline, arch, 7)
    backend = TeaCacheBackend(TeaCacheConfig(rel_l1_thresh=0.0))
    backend.enable(pipeline)
    assert all(hook.coefficients == WAN_TEACACHE[("t2v", 1536)]["coefficients"] for hook in backend.hooks)
    backend.refresh(pipeline, 7)
    assert torch.equal(_generate(pipeline, arch, 7), expected)
    assert backend.cached_steps() == 0


def test_a_high_threshold_skips_every_step_after_the_warmup_but_the_last(tiny_checkpoint,
                                                                         published_settings_on_tiny_wan):
    pipeline = load_pipeline(tiny_checkpoint("wan2.1-t2v"))
    expected = _generate(pipeline, "wan2.1-t2v", 8)
    backend = TeaCacheBackend(TeaCacheConfig(rel_l1_thresh=1000.0))  # warm-up: the model's 5 steps
    backend.enable(pipeline)
    backend.refresh(pipeline, 8)
    calls = _block_calls(pipeline)
    output = _generate(pipeline, "wan2.1-t2v", 8)
    assert backend.counter.cached_steps == [5, 6]
    assert calls["transformer"][0] == 6
    rel = ((output - expected).norm() / expected.norm()).item()
    assert 0 < rel < 0.2, rel


@pytest.mark.parametrize("arch", ["wan2.2-t2v", "wan2.2-i2v"])
def test_both_wan22_experts_skip(tiny_checkpoint, arch):
    """Each expert keeps its own signal and residuals; the request's step count is shared. With one
    warm-up step each expert computes its first step (nothing to compare with) and the request's last."""
    pipeline = load_pipeline(tiny_checkpoint(arch))
    backend = TeaCacheBackend(TeaCacheConfig(rel_l1_thresh=1000.0, warmup_steps=1))
    backend.enable(pipeline)
    backend.refresh(pipeline, 8)
    calls = _block_calls(pipeline)
    _generate(pipeline, arch, 8)
    # transformer: its first step only; transformer_2: its first step and step 7.
    assert (calls["transformer"][0], calls["transformer_2"][0]) == (1, 2)
    assert backend.cached_steps() == 5
