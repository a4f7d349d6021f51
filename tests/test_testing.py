"""The tiny checkpoints have the real diffusers layout and are reproducible."""

import hashlib
import json
import os

import pytest

from diffserve.testing import TINY_ARCHITECTURES, make_tiny_checkpoint


def test_flux_layout(tiny_flux):
    index = json.load(open(os.path.join(tiny_flux, "model_index.json")))
    assert index["_class_name"] == "FluxPipeline"
    for folder, files in {
        "transformer": ["config.json", "diffusion_pytorch_model.safetensors"],
        "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
        "text_encoder": ["config.json", "model.safetensors"],
        "text_encoder_2": ["config.json", "model.safetensors"],
        "tokenizer": ["tokenizer.json"],
        "tokenizer_2": ["tokenizer.json"],
        "scheduler": ["scheduler_config.json"],
    }.items():
        for name in files:
            assert os.path.isfile(os.path.join(tiny_flux, folder, name)), f"{folder}/{name}"


def _digest(path):
    return hashlib.sha256(open(os.path.join(path, "transformer/diffusion_pytorch_model.safetensors"), "rb").read()).hexdigest()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = make_tiny_checkpoint("flux", str(tmp_path / "a"), seed=0)
    b = make_tiny_checkpoint("flux", str(tmp_path / "b"), seed=0)
    c = make_tiny_checkpoint("flux", str(tmp_path / "c"), seed=1)
    assert _digest(a) == _digest(b) != _digest(c)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown tiny architecture 'sdxl'.*flux"):
        make_tiny_checkpoint("sdxl", "/tmp/never")
    assert {"flux", "flux-schnell"} <= set(TINY_ARCHITECTURES)
