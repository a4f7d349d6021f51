"""The adapters resident in one pipeline: loaded once at engine start, selected per batch.

Each adapter's targets are named as diffusers names them (`transformer_blocks.0.attn.to_q`); they
reach our layers through the model's own loading tables (`weight_renames`, `stacked_params_mapping`),
so q/k/v updates land on the fused layer's parts and no model has LoRA code of its own. The layers
hold every adapter (diffserve.layers.lora); a batch runs with the adapters and scales its requests
chose (all its requests chose the same: the `lora` parameter is part of the batch key).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn

from diffserve.layers.lora import LoRAPart, LoRAStack, attach_lora
from diffserve.loader.utils import map_checkpoint_name
from diffserve.lora.formats import AdapterWeights, LoRAFormatError, read_adapter
from diffserve.models.interface import discover_components

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, pipeline: nn.Module, lora_modules: dict[str, str], dtype: torch.dtype | None = None):
        """Load `lora_modules` {name: path} onto `pipeline`'s denoisers, in `dtype` (the activations';
        None: each layer's weight dtype)."""
        self.pipeline_name = type(pipeline).__name__
        self.dtype = dtype
        self.index = {name: i for i, name in enumerate(sorted(lora_modules))}
        self.stacks: list[LoRAStack] = []
        self._active: list[tuple[int, float]] = []
        denoisers = discover_components(pipeline)["dit"]
        for name in sorted(lora_modules):
            adapter = read_adapter(name, lora_modules[name])
            layers = self._attach(adapter, denoisers)
            logger.info("LoRA adapter %r (%s): %d layers", name, adapter.path, layers)

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def _attach(self, adapter: AdapterWeights, denoisers: dict[str, nn.Module]) -> int:
        unknown = sorted(set(adapter.modules) - set(denoisers))
        if unknown:
            raise LoRAFormatError(
                f"LoRA adapter {adapter.name!r} ({adapter.path}) adapts {', '.join(unknown)}, which is not a "
                f"denoiser of {self.pipeline_name}; adapters apply to: {', '.join(denoisers)}"
            )
        count = 0
        for component, modules in adapter.modules.items():
            model = denoisers[component]
            for layer_name, parts in self._parts_by_layer(adapter, component, model, modules).items():
                stack = attach_lora(model.get_submodule(layer_name), self.index[adapter.name], parts,
                                    f"LoRA adapter {adapter.name!r}, {component}.{layer_name}", self.dtype)
                if all(stack is not s for s in self.stacks):
                    self.stacks.append(stack)
                count += 1
        return count

    @staticmethod
    def _parts_by_layer(
        adapter: AdapterWeights, component: str, model: nn.Module, modules: dict[str, list[LoRAPart]]
    ) -> dict[str, list[LoRAPart]]:
        """Our layer name -> the parts it takes, through the model's loading tables."""
        params = {name for name, _ in model.named_parameters()}
        mapping = getattr(model, "stacked_params_mapping", ())
        renames = getattr(model, "weight_renames", ())
        by_layer: dict[str, list[LoRAPart]] = {}
        missing = []
        for module, parts in modules.items():
            target = map_checkpoint_name(f"{module}.weight", params, mapping, renames)
            if target is None:
                missing.append(module)
                continue
            param, shard_id = target
            by_layer.setdefault(param.removesuffix(".weight"), []).extend(
                dataclasses.replace(part, shard_id=shard_id) for part in parts
            )
        if missing:
            raise LoRAFormatError(
                f"LoRA adapter {adapter.name!r} ({adapter.path}) targets {len(missing)} module(s) that "
                f"{component} ({type(model).__name__}) does not have: {', '.join(sorted(missing)[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; it was made for another model"
            )
        return by_layer

    def to(self, device: torch.device) -> None:
        """Keep every adapter on `device`."""
        for stack in self.stacks:
            stack.to(device)

    def activate(self, selection: dict[str, float] | None) -> None:
        """Run what follows with the adapters `{name: scale}` (None or {}: none). Scale 0 is no adapter."""
        unknown = sorted(set(selection or {}) - set(self.index))
        if unknown:
            raise ValueError(f"unknown LoRA adapter(s) {unknown}; loaded: {', '.join(self.names) or 'none'}")
        chosen = sorted((self.index[name], float(scale)) for name, scale in (selection or {}).items() if scale != 0)
        if chosen == self._active:
            return
        for stack in self.stacks:
            stack.activate(chosen)
        self._active = chosen
