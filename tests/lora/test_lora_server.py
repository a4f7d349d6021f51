"""LoRA over HTTP: `serve --lora-modules`, a "lora" field in the body, adapters listed by /v1/models as
models of their own ("<model>:<adapter>", which selects one at scale 1). Requests with different
adapters in a row give what fresh offline engines with each adapter give (the same PNG bytes' pixels)."""

import base64
import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams

BODY = {"prompt": "a red fox in snow", "size": "48x32", "num_inference_steps": 3, "seed": 5}


@pytest.fixture(scope="module")
def server(start_server, tiny_flux, flux_adapters):
    modules = [f"{name}={flux_adapters[name]}" for name in ("style", "detail")]
    return start_server(tiny_flux, "--served-model-name", "tiny-flux", "--lora-modules", *modules)


def _generate(server, **fields) -> np.ndarray:
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=120, json={**BODY, **fields})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))


def _offline(path, adapters, lora) -> np.ndarray:
    modules = {name: adapters[name] for name in lora or {}}
    with Omni(path, dtype="float32", device="cpu", lora_modules=modules) as omni:
        out = omni.generate(BODY["prompt"], OmniDiffusionSamplingParams(
            height=32, width=48, num_inference_steps=3, seed=5, lora=lora))
    return np.asarray(out[0].images[0])


def test_models_lists_each_adapter_as_a_model(server):
    data = httpx.get(f"{server.url}/v1/models").json()["data"]
    ids = [card["id"] for card in data]
    assert ids[0] == "tiny-flux" and ids[-2:] == ["tiny-flux:detail", "tiny-flux:style"]
    assert data[-1]["parent"] == "tiny-flux" and "parent" not in data[0]
    assert httpx.get(f"{server.url}/v1/models/tiny-flux:style").json()["parent"] == "tiny-flux"


def test_requests_with_different_adapters_in_a_row_equal_fresh_engines(server, tiny_flux, flux_adapters):
    served = {
        "style": _generate(server, lora={"style": 1.0}),
        "detail": _generate(server, model="tiny-flux:detail"),  # the model id selects it at scale 1
        "none": _generate(server),
        "both": _generate(server, model="tiny-flux:style", lora={"detail": 0.5}),
    }
    expected = {
        "style": _offline(tiny_flux, flux_adapters, {"style": 1.0}),
        "detail": _offline(tiny_flux, flux_adapters, {"detail": 1.0}),
        "none": _offline(tiny_flux, flux_adapters, None),
        "both": _offline(tiny_flux, flux_adapters, {"style": 1.0, "detail": 0.5}),
    }
    for name, image in served.items():
        np.testing.assert_array_equal(image, expected[name], err_msg=name)
    assert np.abs(served["style"].astype(int) - served["none"]).max() > 2


def test_an_edit_form_takes_lora_as_json(server):
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 80, 40)).save(buffer, format="PNG")
    fields = {"prompt": "make it blue", "size": "48x32", "num_inference_steps": "3", "seed": "1"}
    images = []
    for extra in ({}, {"lora": '{"style": 1.0}'}):
        r = httpx.post(f"{server.url}/v1/images/edits", timeout=120, data={**fields, **extra},
                       files={"image": ("in.png", buffer.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))))
    assert np.abs(images[0].astype(int) - images[1]).max() > 2


@pytest.mark.parametrize("fields, status, message", [
    ({"lora": {"sytle": 1.0}}, 400, "unknown LoRA adapter(s) 'sytle'; the loaded adapters are: detail, style"),
    ({"model": "tiny-flux:nope"}, 404, "available: tiny-flux, "),
    ({"lora": {"style": "strong"}}, 400, "lora"),
    ({"lora": ["style"]}, 400, "lora"),
])
def test_bad_lora_requests_are_clear_errors(server, fields, status, message):
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=60, json={**BODY, **fields})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_online_example_runs_each_adapter(server, tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "online_serving" / "lora" / "openai_lora.py"
    run = subprocess.run([sys.executable, str(example), "--url", f"{server.url}/v1", "--size", "32x32", "--steps",
                          "2", "--output-prefix", str(tmp_path / "served")], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "adapters ['detail', 'style']" in run.stdout
    for label in ("none", "style", "detail", "stacked"):
        assert Image.open(tmp_path / f"served_{label}.png").size == (32, 32)
