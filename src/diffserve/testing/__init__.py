"""Tiny random-weight checkpoints of every supported architecture, in the real diffusers layout.

Used by the tests (conformance against diffusers), the examples and `diffserve make-tiny`. Nothing is
downloaded: weights are random and tokenizers are built in memory.
"""

from __future__ import annotations

import os
from typing import Callable

_CONFORMANCE_EXPORTS = ("CONFORMANCE_CASES", "ConformanceCase", "ConformanceScenario", "output_tensor")


def __getattr__(name: str):
    # The conformance table imports torch; the CLI lists TINY_ARCHITECTURES without it.
    if name in _CONFORMANCE_EXPORTS:
        from diffserve.testing import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# architecture name -> builder(path, seed) -> path
TINY_ARCHITECTURES: dict[str, Callable[[str, int], str]] = {}

# Tiny checkpoints run small by default (written to model_index.json's _diffserve_defaults): a random
# tiny model at a real model's 1024x1024 / 81 frames / 50 steps would only draw noise slowly.
TINY_IMAGE_DEFAULTS = {"height": 32, "width": 32, "num_inference_steps": 4}
TINY_VIDEO_DEFAULTS = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4}
TINY_AUDIO_DEFAULTS = {"num_inference_steps": 4}


def _register(name: str, module: str, func: str, defaults: dict | None = None, **kwargs) -> None:
    def build(path: str, seed: int = 0) -> str:
        import importlib

        built = getattr(importlib.import_module(f"diffserve.testing.{module}"), func)(path, seed=seed, **kwargs)
        if defaults:
            _add_defaults(built, defaults)
        return built

    TINY_ARCHITECTURES[name] = build


def _add_defaults(path: str, defaults: dict) -> None:
    import json

    from diffserve.models.spec import DEFAULTS_KEY

    index_path = os.path.join(path, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index[DEFAULTS_KEY] = {**defaults, **index.get(DEFAULTS_KEY, {})}
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


_register("flux", "flux", "build_tiny_flux", TINY_IMAGE_DEFAULTS, guidance_embeds=True)
_register("flux-schnell", "flux", "build_tiny_flux", TINY_IMAGE_DEFAULTS, guidance_embeds=False)
# The Kontext sizes are about a megapixel: the tiny Kontext keeps each input image's own size and sizes
# its output from the image at 32x32 pixels.
_register("flux-kontext", "flux", "build_tiny_flux",
          {**TINY_IMAGE_DEFAULTS, "max_area": 32 * 32, "auto_resize": False},
          guidance_embeds=True, pipeline="FluxKontextPipeline")
_register("wan2.1-t2v", "wan", "build_tiny_wan_t2v", TINY_VIDEO_DEFAULTS)
_register("wan2.2-t2v", "wan", "build_tiny_wan_t2v", TINY_VIDEO_DEFAULTS, dual=True)
_register("wan2.2-ti2v", "wan", "build_tiny_wan_t2v", {**TINY_VIDEO_DEFAULTS, "height": 64, "width": 64}, ti2v=True)
_register("wan2.1-i2v", "wan", "build_tiny_wan_i2v", TINY_VIDEO_DEFAULTS)
_register("wan2.2-i2v", "wan", "build_tiny_wan_i2v", TINY_VIDEO_DEFAULTS, dual=True)
_register("wan2.2-ti2v-i2v", "wan", "build_tiny_wan_i2v", {**TINY_VIDEO_DEFAULTS, "height": 64, "width": 64},
          ti2v=True)
# The tiny demo model is already small at its 64x64 default; its checkpoint states its own steps.
_register("demo-dit", "demo_dit", "build_tiny_demo_dit")
_register("stable-audio", "stable_audio", "build_tiny_stable_audio", TINY_AUDIO_DEFAULTS)
_register("sd3", "sd3", "build_tiny_sd3", TINY_IMAGE_DEFAULTS, variant="sd3.5-large")
_register("sd3.5-medium", "sd3", "build_tiny_sd3", TINY_IMAGE_DEFAULTS, variant="sd3.5-medium")
_register("sd3-medium", "sd3", "build_tiny_sd3", TINY_IMAGE_DEFAULTS, variant="sd3-medium")
_register("qwen-image", "qwen_image", "build_tiny_qwen_image", TINY_IMAGE_DEFAULTS)
# The edit models encode each input image at about 1024 x 1024 pixels whatever the defaults.
_register("qwen-image-edit", "qwen_image", "build_tiny_qwen_image_edit", {"num_inference_steps": 4})
_register("qwen-image-edit-plus", "qwen_image", "build_tiny_qwen_image_edit_plus", {"num_inference_steps": 4})
# Pipelines diffserve serves through the diffusers adapter (no native port).
_register("pixart-sigma", "pixart", "build_tiny_pixart_sigma", TINY_IMAGE_DEFAULTS)
_register("ltx-video", "ltx", "build_tiny_ltx_video", {**TINY_VIDEO_DEFAULTS, "num_frames": 9})
_register("audioldm2", "audioldm2", "build_tiny_audioldm2", TINY_AUDIO_DEFAULTS)


def load_pipeline(path: str, **config):
    """A checkpoint's pipeline, loaded on the CPU in float32 as a worker loads it (for tests that call
    stages directly). `config`: more OmniDiffusionConfig fields."""
    import torch

    from diffserve.config import OmniDiffusionConfig
    from diffserve.loader import DiffusersPipelineLoader
    from diffserve.registry import resolve_model

    od_config = OmniDiffusionConfig(
        model=path, **{"dtype": "float32", "device": "cpu", "disable_progress_bar": True, **config}
    )
    resolve_model(od_config)
    return DiffusersPipelineLoader(od_config).load_model(torch.device("cpu"))


def pipeline_request(pipeline, prompts, params):
    """A request for calling a loaded pipeline directly: one prompt (str or dict) or a list, admitted
    against the pipeline's spec as the engine would (defaults filled, inputs checked)."""
    from diffserve.engine.admission import admit
    from diffserve.request import OmniDiffusionRequest, PromptInput

    prompts = prompts if isinstance(prompts, list) else [prompts]
    req = OmniDiffusionRequest(prompts=[PromptInput.from_user(p, params) for p in prompts], sampling_params=params)
    return admit(pipeline.spec, req)


def make_tiny_checkpoint(arch: str, path: str, seed: int = 0) -> str:
    """Write a tiny checkpoint of `arch` to `path` (created if needed) and return the path."""
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; available: {', '.join(sorted(TINY_ARCHITECTURES))}")
    os.makedirs(path, exist_ok=True)
    return TINY_ARCHITECTURES[arch](path, seed)


__all__ = [
    "CONFORMANCE_CASES",
    "ConformanceCase",
    "ConformanceScenario",
    "TINY_ARCHITECTURES",
    "load_pipeline",
    "make_tiny_checkpoint",
    "output_tensor",
    "pipeline_request",
]
