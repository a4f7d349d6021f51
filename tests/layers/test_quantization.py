"""FP8 linear layers: weights per output channel and activations per token in float8 e4m3, through
torch._scaled_mm (which also runs on the CPU, so the path is tested here; speed is measured on GPUs)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.layers.linear import ColumnParallelLinear, ReplicatedLinear
from diffserve.layers.quantization import (Fp8LinearMethod, StepPrecision, check_fp8_supported,
                                          quantize_linear_layers)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / (a - b).pow(2).mean())).item()


def test_fp8_linear_is_close_to_the_float_one():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48)
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_(0, 0.05)
    x = torch.randn(3, 5, 64)
    expected = layer(x)
    assert quantize_linear_layers(layer, "fp8") == 1
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 48)
    actual = layer(x)
    # e4m3 keeps 3 mantissa bits: a few percent per element. Measured 3.4e-2.
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert 0 < rel < 0.05


def test_layers_whose_shape_the_kernel_refuses_stay_as_they_are():
    layer = ReplicatedLinear(10, 48)
    layer.weight.data.normal_()
    assert quantize_linear_layers(layer, "fp8") == 0 and layer.weight.dtype == torch.float32


def test_unknown_methods_and_old_gpus_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        quantize_linear_layers(ReplicatedLinear(16, 16), "int3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="needs FP8 tensor cores .* NVIDIA A100 is 8.0"):
        check_fp8_supported(torch.device("cuda", 0))


def test_fp8_converts_the_blocks_attention_and_feed_forward_only(tiny_flux):
    """Embedders, adaLN modulations and the output projection keep the model's dtype."""
    from diffserve.layers.quantization import converted_layers
    from diffserve.testing import load_pipeline

    transformer = load_pipeline(tiny_flux).transformer
    names = {id(module): name for name, module in transformer.named_modules()}
    converted = sorted(names[id(layer)] for layer in converted_layers(transformer))
    assert converted and all(name.startswith(("transformer_blocks.", "single_transformer_blocks.")) for name in converted)
    assert not any(".norm" in name for name in converted)
    assert {"transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.ff.proj_in",
            "single_transformer_blocks.0.proj_out"} <= set(converted)
    assert quantize_linear_layers(transformer, "fp8") == len(converted)
    assert transformer.x_embedder.weight.dtype == torch.float32
    assert transformer.transformer_blocks[0].norm1.linear.weight.dtype == torch.float32


@pytest.fixture(scope="module")
def fp32_and_fp8(tiny_checkpoint):
    params = OmniDiffusionSamplingParams(num_inference_steps=4, seed=3, output_type="pt")
    outputs = {}
    for quantization in (None, "fp8"):
        with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", quantization=quantization) as omni:
            outputs[quantization] = omni.generate("a red circle above a blue square", params)[0].images
    return outputs


def test_fp8_engine_draws_what_the_float_engine_draws(fp32_and_fp8):
    # The tiny random demo model (64x64, CFG): measured 62.0 dB against fp32 (40.7 dB when every linear
    # layer converted, embedders and modulations included).
    assert _psnr(fp32_and_fp8["fp8"], fp32_and_fp8[None]) > 30


def test_fp8_under_tensor_parallel_quantizes_each_shard(tiny_checkpoint, fp32_and_fp8):
    """Each rank quantizes the shard it holds; row-parallel shards get their own scales, so TP 2 is
    not bit-equal to one process, but as close to the float result (measured 62.1 dB)."""
    params = OmniDiffusionSamplingParams(num_inference_steps=4, seed=3, output_type="pt")
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", quantization="fp8",
              tensor_parallel_size=2) as omni:
        tp2 = omni.generate("a red circle above a blue square", params)[0].images
    assert _psnr(tp2, fp32_and_fp8[None]) > 30


@pytest.mark.gpu
def test_fp8_on_the_gpu_matches_bf16():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(1024, 2048).cuda().to(torch.bfloat16)
    layer.weight.data.normal_(0, 0.02)
    layer.bias.data.normal_(0, 0.02)  # the layer leaves it uninitialised; the loader fills it
    x = torch.randn(8, 333, 1024, device="cuda", dtype=torch.bfloat16)
    expected = layer(x)
    layer.quant_method = Fp8LinearMethod()
    layer.quant_method.process_weights(layer)
    rel = ((layer(x).float() - expected.float()).norm() / expected.float().norm()).item()
    assert rel < 0.05


def _float_fp8_and_gated_layers():
    """(a float layer, its FP8 copy, an FP8 copy under a StepPrecision, that precision)."""
    torch.manual_seed(0)
    original = ColumnParallelLinear(64, 48)
    original.weight.data.normal_(0, 0.05)
    fp8, gated = copy.deepcopy(original), copy.deepcopy(original)
    quantize_linear_layers(fp8, "fp8")
    precision = StepPrecision(unquantized_steps=2)
    quantize_linear_layers(gated, "fp8", precision=precision)
    return original, fp8, gated, precision


def test_a_step_precision_switches_between_the_original_and_the_fp8_weights():
    original, fp8, gated, precision = _float_fp8_and_gated_layers()
    x = torch.randn(3, 64)
    for unquantized, reference in ((True, original), (False, fp8), (True, original)):
        precision.unquantized = unquantized
        assert torch.equal(gated(x), reference(x))


def test_requests_stepped_together_run_unquantized_while_any_is_in_its_first_steps():
    precision = StepPrecision(unquantized_steps=2)
    for indices, unquantized in (([0], True), ([1], True), ([2], False), ([5, 1], True), ([5, 2], False)):
        precision.before_step([SimpleNamespace(index=i) for i in indices])
        assert precision.unquantized is unquantized, indices


def test_unquantized_steps_bring_the_trained_models_pictures_back():
    """The trained demo model, 8 steps, fp32 on the CPU, two prompts in one batch: FP8 layers drew 14.8
    and 23.2 dB against the float pictures; with the first 2 steps unquantized 30.2 and 33.9 dB (bound:
    3 dB better each); with all 8, the float pictures."""
    from diffserve.assets import DEMO_MODEL_DIR

    prompts = [{"prompt": "a red circle above a blue square", "seed": 5},
               {"prompt": "a green triangle left of a yellow circle", "seed": 6}]
    params = OmniDiffusionSamplingParams(num_inference_steps=8, output_type="pt")

    def images(**config):
        with Omni(DEMO_MODEL_DIR, dtype="float32", device="cpu", disable_progress_bar=True, **config) as omni:
            return [out.images for out in omni.generate(prompts, params)]

    reference = images()
    fp8 = [_psnr(a, b) for a, b in zip(images(quantization="fp8"), reference)]
    first_two = [_psnr(a, b) for a, b in zip(images(quantization="fp8", unquantized_steps=2), reference)]
    assert all(b > a + 3 for a, b in zip(fp8, first_two)), (fp8, first_two)
    every_step = images(quantization="fp8", unquantized_steps=8)
    assert all(torch.equal(a, b) for a, b in zip(every_step, reference))


def test_compiled_layers_follow_the_step_precision():
    """torch.compile guards on the precision: one graph each, then each step takes the right one."""
    original, fp8, gated, precision = _float_fp8_and_gated_layers()
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(gated, backend=count_graphs)
    x = torch.randn(3, 64)
    for unquantized, reference in ((True, original), (False, fp8), (True, original), (False, fp8)):
        precision.unquantized = unquantized
        assert torch.equal(compiled(x), reference(x))
    assert len(graphs) == 2
