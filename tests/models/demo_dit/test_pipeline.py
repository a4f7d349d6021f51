"""DiffservePixelDiTPipeline through the engine on a tiny random-weight checkpoint: batching, CFG,
defaults, input checks, and the CPU speed budget of the shipped shapes."""

import json
import os

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.registry import get_pipeline_class, read_model_index


def params(**kw):
    return OmniDiffusionSamplingParams(**{"num_inference_steps": 3, "output_type": "pt", **kw})


def test_layout_and_registry(tiny_demo_dit):
    index = read_model_index(tiny_demo_dit)
    assert index["_class_name"] == "DiffservePixelDiTPipeline"
    assert get_pipeline_class(index["_class_name"]).__name__ == "DiffservePixelDiTPipeline"
    for folder, files in {
        "transformer": ["config.json", "diffusion_pytorch_model.safetensors"],
        "text_encoder": ["config.json", "model.safetensors"],
        "tokenizer": ["tokenizer.json", "tokenizer_config.json"],
        "scheduler": ["scheduler_config.json"],
    }.items():
        for name in files:
            assert os.path.isfile(os.path.join(tiny_demo_dit, folder, name)), f"{folder}/{name}"


def test_scheduler_config_is_what_diffusers_writes(tiny_demo_dit):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with open(os.path.join(tiny_demo_dit, "scheduler", "scheduler_config.json")) as f:
        ours = json.load(f)
    loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_demo_dit, subfolder="scheduler")
    written = {
        k: v for k, v in FlowMatchEulerDiscreteScheduler(shift=ours["shift"]).config.items() if not k.startswith("_")
    }
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == written
    assert loaded.config.shift == ours["shift"]


def test_batch_equals_one_by_one(demo_omni):
    prompts = [{"prompt": "a red circle above a blue square", "seed": 1}, {"prompt": "a green triangle", "seed": 2}]
    batched = demo_omni.generate(prompts, params())
    assert batched[0].metrics["batch_size"] == 2
    for prompt, out in zip(prompts, batched):
        alone = demo_omni.generate([prompt], params())[0]
        assert (alone.images - out.images).abs().max().item() < 1e-5


def test_seeded_output_repeats_and_seeds_differ(demo_omni):
    a, b = (demo_omni.generate({"prompt": "a red circle", "seed": 4}, params())[0].images for _ in range(2))
    c = demo_omni.generate({"prompt": "a red circle", "seed": 5}, params())[0].images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_and_negative_prompt_change_the_image(demo_omni):
    def run(**kw):
        prompt = {"prompt": "a red circle", "seed": 3, **kw.pop("prompt_extra", {})}
        return demo_omni.generate(prompt, params(**kw))[0]

    no_cfg, cfg = run(guidance_scale=1.0), run(guidance_scale=4.0)
    negative = run(guidance_scale=4.0, prompt_extra={"negative_prompt": "a blue square"})
    assert no_cfg.metrics["guidance_scale"] == 1.0
    assert not torch.allclose(no_cfg.images, cfg.images) and not torch.allclose(cfg.images, negative.images)


def test_cfg_branches_batched_equal_two_forwards(demo_omni, monkeypatch):
    from diffserve.models.demo_dit.pipeline_demo_dit import DiffservePixelDiTPipeline

    prompt = {"prompt": "a yellow square below a purple circle", "seed": 9, "negative_prompt": "a red circle"}
    batched = demo_omni.generate(prompt, params(guidance_scale=3.0))[0].images
    monkeypatch.setattr(DiffservePixelDiTPipeline, "cfg_batched_inputs", ())
    sequential = demo_omni.generate(prompt, params(guidance_scale=3.0))[0].images
    assert (batched - sequential).abs().max().item() < 1e-5


def test_defaults_come_from_the_checkpoint(demo_omni):
    out = demo_omni.generate({"prompt": "a red circle", "seed": 0}, OmniDiffusionSamplingParams())[0]
    assert out.images[0].size == (64, 64)
    assert out.metrics["num_inference_steps"] == 20 and out.metrics["guidance_scale"] == 4.0


def test_pil_output_and_non_square_size(demo_omni):
    out = demo_omni.generate(
        "a blue triangle", OmniDiffusionSamplingParams(height=32, width=48, num_inference_steps=2)
    )[0]
    assert out.images[0].size == (48, 32) and out.images[0].mode == "RGB"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 30}, "height=30 is not supported by DiffservePixelDiTPipeline: it must be a multiple of 4 "
                         "between 16 and 256"),
        ({"width": 8}, "width=8 is not supported"),
        ({"width": 260}, "width=260 is not supported"),
        ({"max_sequence_length": 32}, "max_sequence_length=32 exceeds the text encoder's limit of 16 tokens"),
        ({"true_cfg_scale": 4.0}, "true_cfg_scale=4.0 is not used by DiffservePixelDiTPipeline"),
    ],
)
def test_bad_input_is_a_value_error(demo_omni, kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo_omni.generate("a red circle", params(**kwargs))


def test_loads_strictly_and_declares_its_components(tiny_demo_dit):
    from diffserve.config import OmniDiffusionConfig
    from diffserve.loader import DiffusersPipelineLoader
    from diffserve.models.interface import discover_components
    from diffserve.registry import resolve_model

    od_config = OmniDiffusionConfig(model=tiny_demo_dit, dtype="float32", device="cpu")
    resolve_model(od_config)
    pipeline = DiffusersPipelineLoader(od_config).load_model(torch.device("cpu"))
    found = discover_components(pipeline)
    assert list(found["dit"]) == ["transformer"] and list(found["encoder"]) == ["text_encoder"] and not found["vae"]
    assert not any(p.is_meta for p in pipeline.parameters())


def test_missing_text_encoder_weights_are_named(tiny_demo_dit, tmp_path):
    import shutil

    from diffserve.loader import WeightLoadingError
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_demo_dit, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    del state["final_norm.weight"]
    save_file(state, str(weights))
    with pytest.raises(WeightLoadingError, match="text_encoder.final_norm.weight"):
        Omni(str(broken), dtype="float32", device="cpu")


def test_unknown_words_are_named_with_the_vocabulary(demo_omni, caplog):
    demo_omni.generate("a pink elephant circle", params(num_inference_steps=1))
    assert "does not know the word(s) 'pink', 'elephant'" in caplog.text
    assert "it knows: a above background below blue circle" in caplog.text
