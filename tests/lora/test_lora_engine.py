"""Adapters in the engine: chosen per request, several resident, never mixed within a batch; scale 0
is no adapter; a request alternating adapters equals a fresh engine holding only that adapter; TP 2
(and HSDP 2) equal one process; a request or an adapter file that cannot work is refused with a
clear error."""

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.engine.admission import batch_key
from diffserve.request import OmniDiffusionRequest, PromptInput

PARAMS = dict(height=32, width=48, num_inference_steps=3, max_sequence_length=16, output_type="pt")
PROMPTS = [{"prompt": "a red fox in snow", "seed": 0}, {"prompt": "a blue car", "seed": 1}]


def _run(omni, lora, prompts=PROMPTS):
    outputs = omni.generate(prompts, OmniDiffusionSamplingParams(**PARAMS, lora=lora))
    return torch.cat([out.images for out in outputs])


def _fresh(path, adapters, lora):
    """A new engine holding only the adapters of `lora`."""
    modules = {name: adapters[name] for name in lora or {}}
    with Omni(path, dtype="float32", device="cpu", lora_modules=modules) as omni:
        return _run(omni, lora)


@pytest.fixture(scope="module")
def omni(tiny_flux, flux_adapters):
    modules = {name: flux_adapters[name] for name in ("style", "detail")}
    with Omni(tiny_flux, dtype="float32", device="cpu", lora_modules=modules) as omni:
        yield omni


def test_requests_alternating_adapters_equal_fresh_engines(omni, tiny_flux, flux_adapters):
    """style, detail, none, style again, two stacked: each run equals an engine made for it alone
    (measured: bit-identical)."""
    sequence = [{"style": 1.0}, {"detail": 1.0}, None, {"style": 1.0}, {"style": 0.5, "detail": 2.0}]
    outputs = [_run(omni, lora) for lora in sequence]
    assert torch.equal(outputs[0], outputs[3])
    for lora, output in zip(sequence, outputs):
        if lora != {"style": 1.0} or output is outputs[0]:
            assert torch.equal(output, _fresh(tiny_flux, flux_adapters, lora)), lora
    assert (outputs[0] - outputs[1]).abs().max() > 0.01 and (outputs[1] - outputs[2]).abs().max() > 0.01


def test_one_call_with_different_adapters_runs_them_apart(omni):
    """Prompts of one generate() call with different adapters never share a batch: each output equals
    the one it gets alone."""
    params = [OmniDiffusionSamplingParams(**PARAMS, lora=lora) for lora in ({"style": 1.0}, {"detail": 1.0})]
    together = omni.generate(PROMPTS, params)
    for prompt, sp, out in zip(PROMPTS, params, together):
        alone = omni.generate([prompt], sp)[0]
        assert torch.equal(out.images, alone.images)
        assert out.metrics["batch_size"] == 1


def test_scale_zero_is_no_adapter_and_batches_with_it(omni):
    assert torch.equal(_run(omni, {"style": 0.0}), _run(omni, None))
    assert torch.equal(_run(omni, {"style": 0.0, "detail": 1.0}), _run(omni, {"detail": 1.0}))
    spec = omni.engine.spec

    def key(lora):
        sp = OmniDiffusionSamplingParams(**PARAMS, lora=lora)
        req = OmniDiffusionRequest(prompts=[PromptInput.from_user("a", sp)], sampling_params=sp)
        return batch_key(spec, omni.engine.admit(req))

    assert key({"style": 0}) == key(None) == key({})
    assert key({"style": 1.0, "detail": 2.0}) == key({"detail": 2, "style": 1})
    assert len({str(key(lora)) for lora in ({"style": 1.0}, {"style": 0.5}, {"detail": 1.0}, None)}) == 4


def test_every_model_takes_lora_once_adapters_are_loaded(omni):
    spec = omni.engine.spec
    assert "lora" in spec.accepted_params and spec.lora_adapters == {"style", "detail"}


def test_unknown_adapter_is_refused_at_admission(omni):
    with pytest.raises(ValueError, match=r"unknown LoRA adapter\(s\) 'sytle'; the loaded adapters are: detail, style"):
        _run(omni, {"sytle": 1.0})


def test_lora_without_loaded_adapters_is_refused(flux_omni):
    with pytest.raises(ValueError, match=r"lora=\{'style': 1.0\} is not used by FluxPipeline: no LoRA adapters are "
                                         r"loaded; load them at start with lora_modules"):
        flux_omni.generate("a fox", OmniDiffusionSamplingParams(lora={"style": 1.0}))


@pytest.mark.parametrize("lora, message", [
    ("style", "lora must be a dict"),
    ({"style": "1"}, "lora scale of 'style' must be a finite number"),
    ({"style": float("nan")}, "must be a finite number"),
    ({"": 1.0}, "non-empty strings"),
])
def test_invalid_lora_values_are_errors(lora, message):
    with pytest.raises(ValueError, match=message):
        OmniDiffusionSamplingParams(lora=lora)


@pytest.mark.parametrize("modules, message", [
    ({"a:b": "x.safetensors"}, "must be a non-empty string without ':'"),
    ({"style": "/nonexistent/adapter.safetensors"}, "does not exist"),
    (["style=x"], "lora_modules must be a dict"),
])
def test_invalid_lora_modules_are_config_errors(tiny_flux, modules, message):
    with pytest.raises(ValueError, match=message):
        Omni(tiny_flux, dtype="float32", device="cpu", lora_modules=modules)


def test_an_adapter_for_another_model_fails_at_start(tiny_flux, wan_adapters):
    with pytest.raises(ValueError, match=r"LoRA adapter 'motion' .* targets \d+ module\(s\) that transformer "
                                         r"\(FluxTransformer2DModel\) does not have: blocks\.0\..*; it was made for "
                                         r"another model"):
        Omni(tiny_flux, dtype="float32", device="cpu", lora_modules={"motion": wan_adapters["motion"]})


@pytest.mark.parametrize("mode", [{"tensor_parallel_size": 2},
                                  pytest.param({"use_hsdp": True, "hsdp_shard_size": 2}, marks=pytest.mark.slow)],
                         ids=["tp2", "hsdp2"])
def test_parallel_with_adapters_matches_single_process(tiny_flux, flux_adapters, mode):
    """2 gloo processes, two stacked adapters with true CFG. TP shards the adapters with the column,
    row, fused and gathered layers; HSDP shards the base weights only. Measured max-abs differences:
    TP2 7.7e-7, HSDP2 2.4e-7; tolerance 1e-4."""
    modules = {name: flux_adapters[name] for name in ("style", "kohya_full")}
    prompts = [{**p, "negative_prompt": "blurry"} for p in PROMPTS]
    sp = OmniDiffusionSamplingParams(**PARAMS, true_cfg_scale=2.0, lora={"style": 0.8, "kohya_full": 0.5})
    results = []
    for parallel in ({}, mode):
        with Omni(tiny_flux, dtype="float32", device="cpu", lora_modules=modules, **parallel) as engine:
            results.append(torch.cat([out.images for out in engine.generate(prompts, sp)]))
    assert (results[0] - results[1]).abs().max().item() <= 1e-4
