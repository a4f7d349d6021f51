"""The same adapter file gives the same output in diffserve as in diffusers (`load_lora_weights` +
`set_adapters`), one adapter and two stacked with scales, for FLUX.1 and Wan; kohya files as
diffusers reads them, and a whole kohya file as its PEFT source; and for SD3, whose port came after
LoRA, with no change to it.

Measured max-abs differences (fp32, CPU, 2026-11-30): FLUX one adapter 8.0e-7, two stacked 8.3e-7,
kohya 6.9e-7, kohya (whole) vs its PEFT source 8.9e-7; Wan2.1 one adapter 2.4e-6, two stacked
1.9e-6; SD3 9.2e-7. Every adapter moves the output by 0.1 or more, so the tolerance 1e-4 tells them apart.
"""

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams

TOLERANCE = 1e-4
# A difference the adapters must make (they change the output by 0.1 or more).
VISIBLE = 0.01

FLUX_PROMPTS = [{"prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 0},
                {"prompt": "a blue car", "negative_prompt": "low quality", "seed": 1}]
FLUX_PARAMS = dict(height=32, width=48, num_inference_steps=3, max_sequence_length=16, guidance_scale=3.5,
                   true_cfg_scale=2.0, output_type="pt")
WAN_PROMPTS = [{"prompt": "a cat surfing a wave", "negative_prompt": "blurry", "seed": 0},
               {"prompt": "a red car at night", "negative_prompt": "low quality", "seed": 1}]
WAN_PARAMS = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0,
                  max_sequence_length=32, output_type="pt")


def _reference_pipeline(pipeline_cls, path, adapters):
    pipe = pipeline_cls.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, file in adapters.items():
        pipe.load_lora_weights(file, adapter_name=name)
    return pipe


def _reference(pipe, prompts, params, lora, output):
    """diffusers with the adapters `lora` {name: scale}, one CPU generator per seed."""
    pipe.set_adapters(list(lora), list(lora.values()))
    kwargs = {k: v for k, v in params.items() if k != "output_type"}
    result = pipe(prompt=[p["prompt"] for p in prompts], negative_prompt=[p["negative_prompt"] for p in prompts],
                  generator=[torch.Generator("cpu").manual_seed(p["seed"]) for p in prompts], output_type="pt",
                  **kwargs)
    return getattr(result, output)


def _ours(omni, prompts, params, lora, output):
    outputs = omni.generate(prompts, OmniDiffusionSamplingParams(**params, lora=lora))
    return torch.cat([getattr(out, output) for out in outputs])


@pytest.fixture(scope="module")
def flux(tiny_flux, flux_adapters):
    from diffusers import FluxPipeline

    with Omni(tiny_flux, dtype="float32", device="cpu", lora_modules=flux_adapters) as omni:
        readable = {name: file for name, file in flux_adapters.items() if name != "kohya_full"}
        base = _ours(omni, FLUX_PROMPTS, FLUX_PARAMS, None, "images")
        yield omni, _reference_pipeline(FluxPipeline, tiny_flux, readable), base


@pytest.fixture(scope="module")
def wan(tiny_wan, wan_adapters):
    from diffusers import WanPipeline

    with Omni(tiny_wan, dtype="float32", device="cpu", lora_modules=wan_adapters) as omni:
        base = _ours(omni, WAN_PROMPTS, WAN_PARAMS, None, "frames")
        yield omni, _reference_pipeline(WanPipeline, tiny_wan, wan_adapters), base


FLUX_CASES = {
    "one_adapter": ({"style": 1.0}, {"style": 1.0}),
    "two_stacked": ({"style": 0.7, "detail": 1.3}, {"style": 0.7, "detail": 1.3}),
    "kohya": ({"kohya": 1.0}, {"kohya": 1.0}),
    # diffusers cannot read this kohya file back at tiny widths (tests/lora/conftest.py): its PEFT
    # source is the reference.
    "kohya_whole_vs_its_source": ({"kohya_full": 0.8}, {"style": 0.8}),
}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_lora_matches_diffusers(flux, case):
    omni, pipe, base = flux
    ours_lora, reference_lora = FLUX_CASES[case]
    expected = _reference(pipe, FLUX_PROMPTS, FLUX_PARAMS, reference_lora, "images")
    actual = _ours(omni, FLUX_PROMPTS, FLUX_PARAMS, ours_lora, "images")
    assert (actual - expected).abs().max().item() <= TOLERANCE
    assert (actual - base).abs().max().item() > VISIBLE


@pytest.mark.parametrize("lora", [{"motion": 1.0}, {"motion": 0.5, "look": -1.0}], ids=["one_adapter", "two_stacked"])
def test_wan_lora_matches_diffusers(wan, lora):
    omni, pipe, base = wan
    expected = _reference(pipe, WAN_PROMPTS, WAN_PARAMS, lora, "frames")
    actual = _ours(omni, WAN_PROMPTS, WAN_PARAMS, lora, "frames")
    assert (actual - expected).abs().max().item() <= TOLERANCE
    assert (actual - base).abs().max().item() > VISIBLE


def test_sd3_lora_matches_diffusers(tiny_checkpoint, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from diffserve.testing.lora import make_tiny_lora

    path = tiny_checkpoint("sd3")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "norm1.linear", "proj_out"]
    adapter = make_tiny_lora(path, str(tmp_path / "sd3.safetensors"), targets, rank=4, alpha=8, seed=1)
    prompts = [{"prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 0}]
    params = dict(height=32, width=32, num_inference_steps=3, guidance_scale=4.0, output_type="pt")
    pipe = _reference_pipeline(StableDiffusion3Pipeline, path, {"a": adapter})
    expected = _reference(pipe, prompts, params, {"a": 0.8}, "images")
    with Omni(path, dtype="float32", device="cpu", lora_modules={"a": adapter}) as omni:
        actual = _ours(omni, prompts, params, {"a": 0.8}, "images")
        base = _ours(omni, prompts, params, None, "images")
    assert (actual - expected).abs().max().item() <= TOLERANCE
    assert (actual - base).abs().max().item() > VISIBLE
