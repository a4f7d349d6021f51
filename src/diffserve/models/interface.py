"""Marker interfaces a pipeline declares; the engine reads them instead of knowing model names."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn


class SupportImageInput:
    """The pipeline takes input images (image-to-image, image-to-video, editing)."""

    support_image_input: ClassVar[bool] = True


class SupportAudioInput:
    """The pipeline takes input audio."""

    support_audio_input: ClassVar[bool] = True


class SupportsComponentDiscovery:
    """Names (dotted paths allowed) of the submodules offload, HSDP and caching act on.

    _dit_modules: the denoisers, kept on the accelerator during the denoise loop.
    _encoder_modules: text/image encoders, offloadable during the loop.
    _vae_modules: VAEs.
    _resident_modules: extra modules layerwise offload must keep on the accelerator.
    """

    _dit_modules: ClassVar[list[str]] = ["transformer"]
    _encoder_modules: ClassVar[list[str]] = []
    _vae_modules: ClassVar[list[str]] = ["vae"]
    _resident_modules: ClassVar[list[str]] = []

    def _first_dit_parameter(self):
        return next(get_submodule_by_path(self, self._dit_modules[0]).parameters())

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: its (first) denoiser's device."""
        return self._first_dit_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's dtype, which latents and embeddings follow."""
        return self._first_dit_parameter().dtype


# Used for pipelines that do not declare SupportsComponentDiscovery.
_FALLBACK_COMPONENTS = {
    "dit": ["transformer", "transformer_2"],
    "encoder": ["text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder"],
    "vae": ["vae"],
    "resident": [],
}


def supports_image_input(pipeline: object) -> bool:
    return bool(getattr(pipeline, "support_image_input", False))


def supports_audio_input(pipeline: object) -> bool:
    return bool(getattr(pipeline, "support_audio_input", False))


def get_submodule_by_path(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def discover_components(pipeline: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """{"dit" | "encoder" | "vae" | "resident": {path: module}} for the modules present."""
    if isinstance(pipeline, SupportsComponentDiscovery):
        names = {
            "dit": pipeline._dit_modules,
            "encoder": pipeline._encoder_modules,
            "vae": pipeline._vae_modules,
            "resident": pipeline._resident_modules,
        }
    else:
        names = _FALLBACK_COMPONENTS
    found: dict[str, dict[str, nn.Module]] = {}
    for kind, paths in names.items():
        found[kind] = {}
        for path in paths:
            module = get_submodule_by_path(pipeline, path)
            if module is not None:
                found[kind][path] = module
            elif isinstance(pipeline, SupportsComponentDiscovery):
                raise AttributeError(f"{type(pipeline).__name__} declares {kind} module {path!r} but has none")
    return found
