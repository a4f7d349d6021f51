"""The candidate FP8 policies of benchmarks/bench_quant_quality.py: which layers each converts, its
FLUX.1-dev cost from the layer shapes (the demo-model PSNR they give is measured by
running the script, not here)."""

import pytest
import torch

from tests.conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_quant_quality")


@pytest.fixture(scope="module")
def demo_transformer():
    from diffserve.models.demo_dit.demo_dit_transformer import DemoDiTTransformer2DModel

    with torch.device("meta"):
        return DemoDiTTransformer2DModel()


def _converted_names(bench, transformer, mode):
    names = {id(module): name for name, module in transformer.named_modules()}
    converted, kept = bench.policy_layers(transformer, bench.parse_policy(mode))
    return {names[id(layer)] for layer in converted}, {names[id(layer)] for layer in kept}


def test_policies_keep_the_named_kinds_and_blocks_in_bf16(bench, demo_transformer):
    converted, kept = _converted_names(bench, demo_transformer, "fp8:keep=attn_out")
    assert kept == {f"transformer_blocks.{i}.attn.to_out" for i in range(8)} and len(converted) == 24
    converted, kept = _converted_names(bench, demo_transformer, "fp8:keep=ff_down,keep_blocks=0+-1")
    assert {"transformer_blocks.7.attn.to_qkv", "transformer_blocks.0.ff.proj_in",
            "transformer_blocks.3.ff.proj_out"} <= kept
    assert "transformer_blocks.3.ff.proj_in" in converted and len(kept) == 8 + 6


def test_misspelt_modes_are_refused_before_loading(bench):
    assert bench.parse_policy("fp8") is None
    with pytest.raises(ValueError, match="unknown kind \\['attn'\\]; kinds are qkv, attn_out"):
        bench.parse_policy("fp8:keep=attn")
    with pytest.raises(ValueError, match="with keys keep, keep_blocks, bf16_steps"):
        bench.parse_policy("fp8:bf16_step=4")


def test_flux_cost_follows_the_layer_shapes(bench):
    # 57 blocks of 12 * 3072^2 multiply-adds per token over 4608 tokens hold all but 0.04% of them;
    # the double blocks' attention output projections are 1/12 of 19 of those blocks.
    assert bench.flux_share("fp8") == pytest.approx(0.0004, abs=1e-4)
    assert bench.flux_share("fp8:keep=attn_out") == pytest.approx(19 / 57 / 12, abs=1e-3)
    assert bench.flux_share("fp8:keep_blocks=0") == pytest.approx(1 / 57, abs=1e-3)
    assert bench.flux_share("fp8:bf16_steps=4") == pytest.approx(0.2 + 0.8 * 0.0004, abs=1e-4)
