"""kohya / sd-scripts LoRA names for FLUX.1, mapped to diffusers' FluxTransformer2DModel modules.

kohya keys name the original BFL modules (`lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight`,
`.lora_up.weight`, `.alpha`, scale alpha / rank). Where BFL fuses what diffusers keeps apart (an
image qkv projection; a single block's linear1 = q, k, v and the MLP input), one down projection
serves all parts and the up projection's rows split among them; the model loader then re-fuses q/k/v
into our fused layer, where the parts share one block of rank.
"""

from __future__ import annotations

import re

import torch

from diffserve.layers.lora import LoRAPart
from diffserve.lora.formats import AdapterWeights, LoRAFormatError

# Double-stream block module -> diffusers modules its up projection's rows split into (equal parts).
DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
# linear1's rows: q, k, v of `inner` each, then FLUX's MLP input, 4 x inner wide.
LINEAR1_PROPORTIONS = (1, 1, 1, 4)
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
# BFL's final modulation emits (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift).
SWAPPED_HALVES = {"final_layer_adaLN_modulation_1"}
_BLOCK_KEY = re.compile(r"(double|single)_blocks_(\d+)_(.+)")
PREFIX = "lora_unet_"


def _targets(kohya_name: str) -> tuple[list[str], tuple[int, ...]]:
    """(diffusers modules, row proportions of the up projection) for a kohya module name."""
    match = _BLOCK_KEY.fullmatch(kohya_name)
    if match:
        kind, index, module = match.groups()
        table = DOUBLE_BLOCK if kind == "double" else SINGLE_BLOCK
        parts = table.get(module)
        if parts is not None:
            block = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
            proportions = LINEAR1_PROPORTIONS if module == "linear1" else (1,) * len(parts)
            return [f"{block}.{index}.{p}" for p in parts], proportions
    elif kohya_name in GLOBAL:
        return [GLOBAL[kohya_name]], (1,)
    raise LoRAFormatError(f"kohya LoRA module {kohya_name!r} is not a FLUX.1 transformer module diffserve knows")


def _split_rows(up: torch.Tensor, proportions: tuple[int, ...], kohya_name: str) -> list[torch.Tensor]:
    unit, remainder = divmod(up.shape[0], sum(proportions))
    if remainder:
        raise LoRAFormatError(
            f"kohya LoRA module {kohya_name!r}: its lora_up has {up.shape[0]} rows, which do not split "
            f"{':'.join(map(str, proportions))} into the FLUX.1 layers it covers"
        )
    return list(up.split([p * unit for p in proportions]))


def read_kohya(tensors: dict[str, torch.Tensor], adapter: AdapterWeights) -> None:
    names = sorted({k.split(".", 1)[0] for k in tensors})
    text_encoder = [n for n in names if n.startswith("lora_te")]
    if text_encoder:
        raise LoRAFormatError(
            f"{adapter.path} also adapts a text encoder ({text_encoder[0]}, ...); diffserve applies LoRA to the "
            "denoiser only: save the adapter without its text-encoder part"
        )
    other = [n for n in names if not n.startswith(PREFIX)]
    if other:
        raise LoRAFormatError(f"{adapter.path}: kohya keys must start with {PREFIX!r}; found {other[:3]}")
    for name in names:
        down = tensors.get(f"{name}.lora_down.weight")
        up = tensors.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise LoRAFormatError(f"{adapter.path}: {name} needs both lora_down.weight and lora_up.weight")
        extra = set(k for k in tensors if k.split(".", 1)[0] == name) - {
            f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"
        }
        if extra:
            raise LoRAFormatError(f"{adapter.path}: keys diffserve cannot apply: {sorted(extra)[:3]}")
        kohya_name = name.removeprefix(PREFIX)
        rank = down.shape[0]
        alpha = tensors.get(f"{name}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / rank
        if kohya_name in SWAPPED_HALVES:
            shift, scale_rows = up.chunk(2, dim=0)
            up = torch.cat([scale_rows, shift])
        modules, proportions = _targets(kohya_name)
        for module, rows in zip(modules, _split_rows(up, proportions, kohya_name)):
            adapter.add("transformer", module, LoRAPart(down=down, up=rows, scale=scale))
