"""Tiny random LoRA adapters for tiny checkpoints, written the way users' files are written.

`make_tiny_lora` adds a PEFT LoraConfig to the checkpoint's diffusers transformer, gives A and B
random values and saves them with the pipeline's own `save_lora_weights` (diffusers/PEFT names, the
LoraConfig in the metadata). `peft_flux_to_kohya` rewrites such a FLUX.1 adapter in the kohya /
sd-scripts layout (BFL module names, fused qkv and linear1, alpha keys). Needs peft (the dev extra).
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

# Every kind of linear layer in our FLUX.1 port: fused q/k/v (both streams), row-parallel outputs
# (one with a packed input), column-parallel MLPs, gathered adaLN modulations, replicated embedders.
FLUX_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "norm1.linear", "norm1_context.linear",
    "proj_mlp", "proj_out", "norm.linear", "x_embedder", "context_embedder", "timestep_embedder.linear_1",
]
# What diffusers itself reads back from a kohya file of a tiny FLUX.1: the double blocks. Its
# converter hard-codes FLUX.1-dev's widths for single blocks' linear1, leaves the embedders' keys
# without the "transformer." prefix (so they are dropped) and applies no alpha to the final layer.
# (A PEFT regex, matched whole.)
FLUX_KOHYA_TARGETS = (
    r"^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|norm1\.linear|norm1_context\.linear)$"
)
# Wan: fused self-attention q/k/v, cross-attention q and merged k/v, MLPs, the time projection.
WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "time_proj", "proj_out"]


def _pipeline_and_transformer_classes(checkpoint: str, component: str):
    import diffusers

    from diffserve.registry import read_model_index

    index = read_model_index(checkpoint)
    return getattr(diffusers, index["_class_name"]), getattr(diffusers, index[component][1])


def make_tiny_lora(
    checkpoint: str,
    out_file: str,
    targets: list[str] | str,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    std: float = 0.1,
    component: str = "transformer",
) -> str:
    """A random adapter on `checkpoint`'s `component`, in diffusers' format; returns `out_file`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline_cls, transformer_cls = _pipeline_and_transformer_classes(checkpoint, component)
    model = transformer_cls.from_pretrained(checkpoint, subfolder=component, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        init_lora_weights=False)
    model.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    folder, name = os.path.split(os.path.abspath(out_file))
    pipeline_cls.save_lora_weights(
        folder, **{f"{component}_lora_layers": get_peft_model_state_dict(model)}, weight_name=name,
        **{f"{component}_lora_adapter_metadata": config.to_dict()},
    )
    return out_file


# diffusers FLUX.1 module (inside a block) -> (BFL module, position in its fused group).
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0), "ff.net.0.proj": ("img_mlp_0", 0), "ff.net.2": ("img_mlp_2", 0),
    "norm1.linear": ("img_mod_lin", 0), "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1), "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", 0), "ff_context.net.0.proj": ("txt_mlp_0", 0),
    "ff_context.net.2": ("txt_mlp_2", 0), "norm1_context.linear": ("txt_mod_lin", 0),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation_lin", 0),
}
_FLUX_GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear",
                "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer"}


def _bfl_name(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
        table = _FLUX_DOUBLE if parts[0] == "transformer_blocks" else _FLUX_SINGLE
        kind = "double" if parts[0] == "transformer_blocks" else "single"
        bfl, position = table[".".join(parts[2:])]
        return f"{kind}_blocks_{parts[1]}_{bfl}", position
    return _FLUX_GLOBAL[module], 0


def peft_flux_to_kohya(peft_file: str, out_file: str) -> str:
    """The FLUX.1 adapter `peft_file` (make_tiny_lora) in kohya's layout. A fused BFL module gets the
    parts' down projections stacked and their up projections block-diagonal (each part its own rank),
    with alpha chosen so alpha / rank is the PEFT scale. Every part of a fused module must be present."""
    from safetensors.torch import save_file

    from diffserve.lora.formats import read_adapter

    adapter = read_adapter("source", peft_file)
    groups: dict[str, dict[int, object]] = defaultdict(dict)
    for module, parts in adapter.modules["transformer"].items():
        bfl, position = _bfl_name(module)
        groups[bfl][position] = parts[0]
    tensors = {}
    for bfl, parts in groups.items():
        ordered = [parts[i] for i in sorted(parts)]
        if sorted(parts) != list(range(len(parts))) or len({p.scale for p in ordered}) != 1:
            raise ValueError(f"{bfl}: needs all its parts, with one scale")
        down = torch.cat([p.down for p in ordered])
        up = torch.block_diag(*[p.up for p in ordered])
        tensors[f"lora_unet_{bfl}.lora_down.weight"] = down.contiguous()
        tensors[f"lora_unet_{bfl}.lora_up.weight"] = up.contiguous()
        tensors[f"lora_unet_{bfl}.alpha"] = torch.tensor(ordered[0].scale * down.shape[0])
    save_file(tensors, out_file)
    return out_file


def write_random_lora(
    checkpoint: str, out_file: str, targets: tuple[str, ...], *, rank: int = 4, seed: int = 0, std: float = 0.1,
    component: str = "transformer",
) -> str:
    """A random adapter in diffusers' layout without peft: every linear layer of `checkpoint`'s
    `component` whose name ends with one of `targets` gets A [rank, in] and B [out, rank]."""
    from safetensors.torch import save_file

    _, transformer_cls = _pipeline_and_transformer_classes(checkpoint, component)
    model = transformer_cls.from_pretrained(checkpoint, subfolder=component, torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(targets)):
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
            tensors[f"{component}.{name}.lora_A.weight"] = down * std
            tensors[f"{component}.{name}.lora_B.weight"] = up * std
    if not tensors:
        raise ValueError(f"no linear layer of {checkpoint}/{component} ends with any of {targets}")
    save_file(tensors, out_file)
    return out_file
