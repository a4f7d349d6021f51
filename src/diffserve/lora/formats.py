"""Reading LoRA adapter files into one form: per pipeline component, per diffusers module name, the
update (A, B, alpha scale).

Two layouts are read, both from safetensors:
- diffusers / PEFT, as `pipe.save_lora_weights` writes and `pipe.load_lora_weights` reads:
  `transformer.<module>.lora_A.weight` [rank, in] and `.lora_B.weight` [out, rank]. The alpha scale
  comes from `<module>.alpha` keys, else from the LoraConfig diffusers stores in the file's metadata
  (`lora_alpha`, `alpha_pattern`, `use_rslora`), else it is 1 (diffusers' convention: alpha = rank).
- kohya / sd-scripts for FLUX.1: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (diffserve.lora.kohya maps the names).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from diffserve.layers.lora import LoRAPart

# diffusers keeps the adapter's LoraConfig in the safetensors metadata under this key.
METADATA_KEY = "lora_adapter_metadata"
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")


class LoRAFormatError(ValueError):
    """An adapter file that cannot be read or does not fit the model."""


@dataclass
class AdapterWeights:
    """One adapter: {component: {diffusers module name: [LoRAPart, ...]}}. A module has several parts
    when one update covers what the target model keeps as several layers (kohya's fused qkv)."""

    name: str
    path: str
    modules: dict[str, dict[str, list[LoRAPart]]] = field(default_factory=dict)

    def add(self, component: str, module: str, part: LoRAPart) -> None:
        self.modules.setdefault(component, {}).setdefault(module, []).append(part)


def adapter_file(path: str) -> str:
    """The safetensors file of an adapter given as a file or as the folder `save_lora_weights` wrote."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if "pytorch_lora_weights.safetensors" in files:
            files = ["pytorch_lora_weights.safetensors"]
        if len(files) != 1:
            raise LoRAFormatError(
                f"LoRA folder {path} must hold one .safetensors file (or pytorch_lora_weights.safetensors); "
                f"it holds {files or 'none'}"
            )
        return os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise LoRAFormatError(f"LoRA adapter file {path} does not exist")
    return path


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoRAFormatError(f"cannot read LoRA adapter {path}: not a safetensors file ({exc})") from None


def read_adapter(name: str, path: str) -> AdapterWeights:
    """The adapter `name` stored at `path`, in any format we know."""
    file = adapter_file(path)
    tensors, metadata = read_safetensors(file)
    check_supported_kind(tensors, file)
    adapter = AdapterWeights(name=name, path=file)
    if any(k.endswith(KOHYA_SUFFIXES) for k in tensors):
        from diffserve.lora.kohya import read_kohya

        read_kohya(tensors, adapter)
    elif any(k.endswith(PEFT_SUFFIXES) for k in tensors):
        read_peft(tensors, _peft_configs(metadata, file), adapter)
    else:
        raise LoRAFormatError(
            f"{file} is in no LoRA format diffserve reads: expected diffusers/PEFT keys "
            f"('transformer.<module>.lora_A.weight' / '.lora_B.weight') or kohya keys for FLUX "
            f"('lora_unet_<module>.lora_down.weight' / '.lora_up.weight'); its first keys are {sorted(tensors)[:4]}"
        )
    return adapter


def check_supported_kind(tensors: dict[str, torch.Tensor], file: str) -> None:
    """LoRA variants with more than A and B are refused rather than applied in part."""
    for marker, kind in (("lora_magnitude_vector", "DoRA"), ("dora_scale", "DoRA"), (".lokr_", "LoKr"),
                         (".hada_", "LoHa"), ("lora_B.bias", "a LoRA bias (lora_bias=True)")):
        if any(marker in k for k in tensors):
            raise LoRAFormatError(f"{file} is {kind}; diffserve applies plain LoRA (A and B) only")


# -- diffusers / PEFT ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeftScaling:
    """How PEFT turns alpha into a module's scale (the LoraConfig diffusers saved with the file)."""

    lora_alpha: float | None = None  # None: alpha = rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def scale(self, module: str, rank: int) -> float:
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            # PEFT's rule: a pattern matches a module name ending in it, on a dot boundary.
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        if alpha is None:
            return 1.0
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _peft_configs(metadata: dict[str, str], file: str) -> dict[str, PeftScaling]:
    """Per component ('transformer'), the scaling fields of the LoraConfig diffusers saved, if any."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        values: dict[str, Any] = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoRAFormatError(f"{file}: its {METADATA_KEY} metadata is not valid JSON ({exc})") from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    for component, config in configs.items():
        if config.get("use_dora"):
            raise LoRAFormatError(
                f"{file} is DoRA (use_dora in its {component} config); diffserve applies plain LoRA only"
            )
    return {
        component: PeftScaling(
            lora_alpha=config.get("lora_alpha"),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            use_rslora=bool(config.get("use_rslora")),
        )
        for component, config in configs.items()
    }


def read_peft(tensors: dict[str, torch.Tensor], configs: dict[str, PeftScaling], adapter: AdapterWeights) -> None:
    unknown = sorted(k for k in tensors if not k.endswith(PEFT_SUFFIXES) and not k.endswith(".alpha"))
    if unknown:
        raise LoRAFormatError(f"{adapter.path}: keys that are neither lora_A, lora_B nor alpha: {unknown[:5]}")
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        target = key.removesuffix(".lora_A.weight")
        up = tensors.get(f"{target}.lora_B.weight")
        if up is None:
            raise LoRAFormatError(f"{adapter.path}: {key} has no matching {target}.lora_B.weight")
        component, _, module = target.partition(".")
        if not module:
            raise LoRAFormatError(
                f"{adapter.path}: key {key!r} does not name the component it adapts; diffusers-format keys start "
                "with it ('transformer.<module>.lora_A.weight')"
            )
        down = tensors[key]
        rank = down.shape[0]
        alpha = tensors.get(f"{target}.alpha")
        if alpha is not None:
            scale = float(alpha) / rank
        else:
            scale = configs.get(component, PeftScaling()).scale(module, rank)
        adapter.add(component, module, LoRAPart(down=down, up=up, scale=scale))
    orphans = sorted(k for k in tensors if k.endswith(".lora_B.weight")
                     and k.removesuffix(".lora_B.weight") + ".lora_A.weight" not in tensors)
    if orphans:
        raise LoRAFormatError(f"{adapter.path}: {orphans[0]} has no matching lora_A.weight")
