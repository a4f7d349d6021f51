"""The tiny Qwen-Image checkpoints: the real diffusers layout, loadable without torchvision, and
diffusers' own pipelines generate from them (with diffusers' transformer and with ours)."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffserve.loader.diffusers_loader import materialize_meta_tensors
from diffserve.loader.weight_utils import weights_iterator
from diffserve.models.qwen_image.qwen_image_transformer import QwenImageTransformer2DModel, QwenImageTransformerConfig
from diffserve.models.qwen_image.processor import load_qwen2vl_processor

# Measured (2026-11-30): the transformers' outputs differ by float32 rounding (below 1e-6) at every
# step of these runs, the images (in [0, 1]) by 1.1e-5 (qwen-image), 3.0e-6 (edit) and 3.6e-6
# (edit-plus): the perturbed tiny VAE decoders amplify latent differences.
PIPELINE_TOLERANCE = 5e-5


def make_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# architecture -> (pipeline class, call arguments). The edit pipelines resize their input images to
# about 1024 x 1024 pixels themselves (and Edit-Plus its vision inputs to 384 x 384), whatever they are given.
CASES = {
    "qwen-image": (
        "QwenImagePipeline",
        # Two prompts of different lengths: the shorter one is padded and masked. CFG on, with one
        # negative prompt whose text broadcasts over both images (as diffusers allows). Non-square.
        dict(prompt=["a red fox", "a small cat sleeping on a long striped mat"], negative_prompt="blurry",
             true_cfg_scale=4.0, height=64, width=48),
    ),
    "qwen-image-edit": (
        "QwenImageEditPipeline",
        dict(image=make_image(56, 40, 0), prompt="make it blue", negative_prompt="ugly", true_cfg_scale=4.0,
             height=64, width=96),
    ),
    "qwen-image-edit-plus": (
        "QwenImageEditPlusPipeline",
        dict(image=[make_image(56, 40, 0), make_image(32, 48, 1)], prompt="put the cat in the first picture",
             true_cfg_scale=1.0, height=96, width=64),
    ),
}


def load_diffusers_pipeline(folder: str, class_name: str):
    import diffusers

    components = {}
    if os.path.isdir(os.path.join(folder, "processor")):
        components["processor"] = load_qwen2vl_processor(os.path.join(folder, "processor"))
    pipe = getattr(diffusers, class_name).from_pretrained(folder, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, arguments) -> torch.Tensor:
    return pipe(**arguments, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images


def use_our_transformer(pipe, folder: str) -> None:
    """Route the pipeline's transformer calls (the same keyword arguments) to our transformer."""
    with torch.device("meta"):
        ours = QwenImageTransformer2DModel(QwenImageTransformerConfig.from_pretrained(folder))
    materialize_meta_tensors(ours, torch.device("cpu"))
    ours.load_weights(weights_iterator(folder))
    ours.eval()

    def forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes,
                guidance=None, attention_kwargs=None, additional_t_cond=None, return_dict=True):
        assert guidance is None and not attention_kwargs and not return_dict
        return (ours(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes,
                     additional_t_cond=additional_t_cond),)

    pipe.transformer.forward = forward


@pytest.mark.parametrize("arch", list(CASES))
def test_diffusers_pipeline_generates_from_tiny_checkpoint(tiny_checkpoint, arch):
    folder = tiny_checkpoint(arch)
    class_name, arguments = CASES[arch]
    assert read_json(folder, "model_index.json")["_class_name"] == class_name
    pipe = load_diffusers_pipeline(folder, class_name)
    with torch.no_grad():
        expected = generate(pipe, arguments)
        use_our_transformer(pipe, os.path.join(folder, "transformer"))
        actual = generate(pipe, arguments)
    batch = len(arguments["prompt"]) if isinstance(arguments["prompt"], list) else 1
    assert expected.shape == (batch, 3, arguments["height"], arguments["width"])
    assert torch.isfinite(expected).all() and expected.std() > 0.01
    if batch > 1:
        assert (expected[0] - expected[1]).abs().max() > 1e-3  # the prompts reach the image
    assert (actual - expected).abs().max().item() <= PIPELINE_TOLERANCE


@pytest.mark.parametrize("arch", ["qwen-image-edit", "qwen-image-edit-plus"])
def test_processor_folder_is_named_as_released_and_loads_without_torchvision(tiny_checkpoint, arch):
    folder = tiny_checkpoint(arch)
    assert read_json(folder, "model_index.json")["processor"] == ["transformers", "Qwen2VLProcessor"]
    processor_config = read_json(folder, "processor/processor_config.json")
    assert processor_config["processor_class"] == "Qwen2VLProcessor"
    assert processor_config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    processor = load_qwen2vl_processor(os.path.join(folder, "processor"))
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>a cat"], images=[make_image(300, 200, 0)],
                       padding=True, return_tensors="pt")
    # A 300 x 200 image reaches the vision tower at no more than 112 x 112 pixels: 4 x 4 merged tokens at most.
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum().item()
    assert image_tokens == inputs["image_grid_thw"].prod().item() // 4 <= 16


def read_json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "arch, zero_cond_t, vae_downsamplings",
    [("qwen-image", False, 3), ("qwen-image-edit", False, 4), ("qwen-image-edit-plus", True, 4)],
)
def test_tiny_checkpoint_is_small_with_the_released_scheduler(tiny_checkpoint, arch, zero_cond_t, vae_downsamplings):
    folder = tiny_checkpoint(arch)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert size < 2_000_000
    assert read_json(folder, "transformer/config.json")["zero_cond_t"] is zero_cond_t
    assert len(read_json(folder, "vae/config.json")["temperal_downsample"]) == vae_downsamplings
    scheduler = read_json(folder, "scheduler/scheduler_config.json")
    assert scheduler["use_dynamic_shifting"] and scheduler["time_shift_type"] == "exponential"
    assert (scheduler["base_shift"], scheduler["max_shift"], scheduler["shift_terminal"]) == (0.5, 0.9, 0.02)


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path):
    from diffserve.testing import make_tiny_checkpoint

    def digest(path):
        with open(os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    a, b, c = (make_tiny_checkpoint("qwen-image-edit-plus", str(tmp_path / name), seed=seed)
               for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    assert digest(a) == digest(b) != digest(c)
    assert read_json(a, "processor/processor_config.json") == read_json(b, "processor/processor_config.json")
