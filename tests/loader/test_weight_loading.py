"""Loader strictness: every weight filled exactly once, mismatches name the keys."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.loader.weight_utils import WeightLoadingError, find_weight_files

TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"
PARAMS = OmniDiffusionSamplingParams(height=16, width=16, num_inference_steps=2, max_sequence_length=8, seed=0, output_type="pt")


@pytest.fixture
def ckpt(tiny_flux, tmp_path):
    """A private copy of the tiny FLUX checkpoint that a test may damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_flux, path)
    return path


def _generate(path, **kwargs):
    with Omni(str(path), dtype="float32", device="cpu", **kwargs) as omni:
        return omni.generate("a fox", PARAMS)[0].images


def _rewrite(path, edit):
    state = load_file(path / TRANSFORMER_FILE)
    edit(state)
    save_file(state, path / TRANSFORMER_FILE)


def test_missing_key_is_named(ckpt):
    _rewrite(ckpt, lambda s: s.pop("x_embedder.weight"))
    with pytest.raises(WeightLoadingError, match=r"missing 1 weight.*transformer\.x_embedder\.weight"):
        _generate(ckpt)


def test_missing_shard_of_fused_qkv_is_reported(ckpt):
    _rewrite(ckpt, lambda s: s.pop("transformer_blocks.1.attn.to_k.weight"))
    with pytest.raises(WeightLoadingError, match=r"transformer_blocks\.1\.attn\.to_qkv\.weight"):
        _generate(ckpt)


def test_unexpected_key_is_named(ckpt):
    _rewrite(ckpt, lambda s: s.update({"transformer_blocks.0.attn.extra_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(WeightLoadingError, match=r"unexpected.*transformer_blocks\.0\.attn\.extra_proj\.weight"):
        _generate(ckpt)


def test_shape_mismatch_names_key_and_shapes(ckpt):
    _rewrite(ckpt, lambda s: s.update({"proj_out.bias": torch.zeros(3)}))
    with pytest.raises(WeightLoadingError, match=r"proj_out\.bias.*shape \(16,\).*\(3,\)"):
        _generate(ckpt)


def test_truncated_file_is_a_clear_error(ckpt):
    path = ckpt / TRANSFORMER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadingError, match="truncated or corrupt"):
        _generate(ckpt)


def test_bin_fallback_loads_the_same_weights(ckpt, tiny_flux):
    state = load_file(ckpt / TRANSFORMER_FILE)
    os.remove(ckpt / TRANSFORMER_FILE)
    torch.save(state, ckpt / "transformer/diffusion_pytorch_model.bin")
    assert find_weight_files(str(ckpt / "transformer"))[1] == "pt"
    torch.testing.assert_close(_generate(ckpt), _generate(tiny_flux), rtol=0, atol=0)


def test_bin_is_loaded_with_weights_only(ckpt):
    os.remove(ckpt / TRANSFORMER_FILE)
    # A pickle holding a non-tensor object: weights_only loading must refuse it.
    torch.save({"x_embedder.weight": torch.nn.Linear(2, 2)}, ckpt / "transformer/diffusion_pytorch_model.bin")
    with pytest.raises(WeightLoadingError, match="weights_only"):
        _generate(ckpt)


def test_no_weights_without_fallback_lists_what_is_there(ckpt):
    os.remove(ckpt / TRANSFORMER_FILE)
    with pytest.raises(WeightLoadingError) as err:
        find_weight_files(str(ckpt / "transformer"), fall_back_to_pt=False)
    assert "*.safetensors" in str(err.value) and "config.json" in str(err.value)


def test_sharded_checkpoint_with_index(ckpt, tiny_flux):
    state = load_file(ckpt / TRANSFORMER_FILE)
    os.remove(ckpt / TRANSFORMER_FILE)
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, ckpt / "transformer" / file)
        weight_map.update({k: file for k in keys})
    index = ckpt / "transformer/diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.testing.assert_close(_generate(ckpt), _generate(tiny_flux), rtol=0, atol=0)

    os.remove(ckpt / "transformer/model-00002-of-00002.safetensors")
    with pytest.raises(WeightLoadingError, match="shard file.*do not exist"):
        find_weight_files(str(ckpt / "transformer"))
