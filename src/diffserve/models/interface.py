"""Marker interfaces a pipeline declares; the engine reads them instead of knowing model names."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn


class SupportImageInput:
    """The pipeline takes input images (image-to-image, image-to-video, editing). Kept for code written
    against the seed's contract; the engine reads what a model takes from its SamplingSpec
    (diffserve.models.spec), whose `images` must then be set."""

    support_image_input: ClassVar[bool] = True


class SupportAudioInput:
    """The pipeline takes input audio (see SupportImageInput)."""

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
    # Set by CPU offload (diffserve.offload), under which weights wait on the host between uses.
    _execution_device: torch.device | None = None
    # Set by the engine for unquantized_steps (diffserve.layers.quantization.StepPrecision); denoise_step
    # tells it each step which requests it runs.
    step_precision = None

    def _first_dit_parameter(self):
        return next(get_submodule_by_path(self, self._dit_modules[0]).parameters())

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: its (first) denoiser's device, or under offload the device the
        weights are brought to."""
        if self._execution_device is not None:
            return self._execution_device
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


# -- what a transformer declares, and what the engine derives from it --------------------------------
# A transformer names its repeated block classes in `_repeated_blocks` (regional compile). Unless it
# declares more, the engine derives from those names: the block lists (`_layerwise_offload_blocks_attrs`,
# for offload and step caching) and the modules HSDP shards (`_hsdp_shard_conditions`).


def is_repeated_block(module: nn.Module, names: set[str] | list[str]) -> bool:
    """Whether `module` is one of the named block classes (wrappers such as FSDP2 subclass the block's
    class, so the whole class hierarchy is matched)."""
    return any(cls.__name__ in names for cls in type(module).__mro__)


def block_list_attrs(transformer: nn.Module) -> list[str]:
    """The transformer's block lists, in call order: `_layerwise_offload_blocks_attrs` if declared,
    else every ModuleList child whose items are all `_repeated_blocks`, in registration order."""
    declared = getattr(transformer, "_layerwise_offload_blocks_attrs", None)
    if declared is not None:
        return list(declared)
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return [
        attr
        for attr, child in transformer.named_children()
        if isinstance(child, nn.ModuleList) and len(child) and all(is_repeated_block(b, names) for b in child)
    ]


def hsdp_shard_conditions(transformer: nn.Module) -> list:
    """`_hsdp_shard_conditions` if declared, else one condition: the module is a repeated block."""
    declared = getattr(type(transformer), "_hsdp_shard_conditions", None)
    if declared:
        return list(declared)
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return [lambda name, module: is_repeated_block(module, names)] if names else []
