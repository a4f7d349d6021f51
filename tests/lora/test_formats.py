"""Reading adapter files: diffusers/PEFT names with their alpha (keys or saved LoraConfig), kohya
FLUX.1 names (fused modules split, alpha, the final layer's swapped halves), and one clear error for
every file that cannot be applied."""

import json

import pytest
import torch
from safetensors.torch import save_file

from diffserve.lora.formats import LoRAFormatError, read_adapter


def _save(tmp_path, tensors, metadata=None, name="adapter.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def _pair(prefix, out_features=6, in_features=4, rank=2):
    return {f"{prefix}.lora_A.weight": torch.randn(rank, in_features),
            f"{prefix}.lora_B.weight": torch.randn(out_features, rank)}


def _scales(adapter):
    return {module: parts[0].scale for module, parts in adapter.modules["transformer"].items()}


def test_peft_without_alpha_has_scale_one(tmp_path):
    adapter = read_adapter("a", _save(tmp_path, _pair("transformer.blocks.0.attn.to_q")))
    [part] = adapter.modules["transformer"]["blocks.0.attn.to_q"]
    assert part.scale == 1.0 and part.down.shape == (2, 4) and part.up.shape == (6, 2)


def test_peft_alpha_from_keys_and_from_the_saved_config(tmp_path):
    tensors = {**_pair("transformer.a"), "transformer.a.alpha": torch.tensor(8.0), **_pair("transformer.b.proj")}
    assert _scales(read_adapter("x", _save(tmp_path, tensors))) == {"a": 4.0, "b.proj": 1.0}
    config = {"transformer.lora_alpha": 6, "transformer.r": 2, "transformer.alpha_pattern": {"b.proj": 1},
              "transformer.use_rslora": False}
    tensors = {**_pair("transformer.a"), **_pair("transformer.b.proj"), **_pair("transformer.c.b.proj2")}
    path = _save(tmp_path, tensors, {"lora_adapter_metadata": json.dumps(config)}, "config.safetensors")
    # alpha_pattern matches a module name ending in the pattern on a dot boundary, as PEFT does.
    assert _scales(read_adapter("x", path)) == {"a": 3.0, "b.proj": 0.5, "c.b.proj2": 3.0}
    config["transformer.use_rslora"] = True
    path = _save(tmp_path, _pair("transformer.a", rank=4), {"lora_adapter_metadata": json.dumps(config)}, "rs.st")
    assert _scales(read_adapter("x", path)) == {"a": 3.0}  # alpha / sqrt(rank)


def test_a_folder_written_by_save_lora_weights_is_read(tmp_path):
    _save(tmp_path, _pair("transformer.a"), name="pytorch_lora_weights.safetensors")
    assert "a" in read_adapter("x", str(tmp_path)).modules["transformer"]


def test_kohya_fused_modules_split_with_one_down_projection(tmp_path):
    inner, rank = 4, 2
    down, up = torch.randn(rank, 8), torch.randn(7 * inner, rank)
    tensors = {"lora_unet_single_blocks_1_linear1.lora_down.weight": down,
               "lora_unet_single_blocks_1_linear1.lora_up.weight": up,
               "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(1.0)}
    modules = read_adapter("k", _save(tmp_path, tensors)).modules["transformer"]
    names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    rows = [up[:inner], up[inner : 2 * inner], up[2 * inner : 3 * inner], up[3 * inner :]]
    for name, expected in zip(names, rows):
        [part] = modules[f"single_transformer_blocks.1.{name}"]
        assert torch.equal(part.down, down) and torch.equal(part.up, expected) and part.scale == 0.5


def test_kohya_final_modulation_swaps_shift_and_scale(tmp_path):
    up = torch.arange(8.0).reshape(8, 1)
    tensors = {"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.ones(1, 4),
               "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up}
    [part] = read_adapter("k", _save(tmp_path, tensors)).modules["transformer"]["norm_out.linear"]
    assert torch.equal(part.up, torch.cat([up[4:], up[:4]]))  # BFL (shift, scale) -> diffusers (scale, shift)


@pytest.mark.parametrize("tensors, message", [
    ({"foo.weight": torch.zeros(2)}, r"is in no LoRA format diffserve reads: expected diffusers/PEFT keys"),
    ({**_pair("transformer.a"), "transformer.a.lora_magnitude_vector": torch.zeros(6)}, "is DoRA"),
    ({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(4, 2),
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)},
     r"also adapts a text encoder \(lora_te1_.*\); diffserve applies LoRA to the denoiser only"),
    ({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_down_blocks_0_attn.lora_up.weight": torch.zeros(4, 2)},
     r"kohya LoRA module 'down_blocks_0_attn' is not a FLUX.1 transformer module"),
    ({"transformer.a.lora_A.weight": torch.zeros(2, 4)}, r"has no matching transformer.a.lora_B.weight"),
    ({"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)},
     r"does not name the component it adapts"),
])
def test_files_that_cannot_be_applied_are_clear_errors(tmp_path, tensors, message):
    with pytest.raises(LoRAFormatError, match=message):
        read_adapter("x", _save(tmp_path, tensors))


def test_a_file_that_is_not_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"\x80\x04not a safetensors file at all" * 10)
    with pytest.raises(LoRAFormatError, match=r"cannot read LoRA adapter .*adapter.bin: not a safetensors file"):
        read_adapter("x", str(path))
    with pytest.raises(LoRAFormatError, match="does not exist"):
        read_adapter("x", str(tmp_path / "missing.safetensors"))
