"""scripts/train_demo_model.py: a smoke run on the CPU writes a checkpoint our pipeline loads and
generates from, reproducibly, without diffusers (the GPU training machine has none)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPT = os.path.join(REPO, "scripts", "train_demo_model.py")

# Runs the script as `python scripts/train_demo_model.py ...` with diffusers made unimportable.
WITHOUT_DIFFUSERS = (
    "import runpy, sys; sys.modules['diffusers'] = None; "
    "sys.argv = [sys.argv[1]] + sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def train(out, *extra):
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_DIFFUSERS, SCRIPT, "--out", str(out), "--smoke", "--steps", "6", *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def digest(folder):
    h = hashlib.sha256()
    for sub in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        h.update(open(os.path.join(folder, sub), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "model"
    result = train(out)
    return out, result


def test_smoke_run_writes_a_loadable_checkpoint_and_report(smoke_run):
    out, result = smoke_run
    assert "trained 6 steps" in result.stdout
    report = f"{out}-report"
    for name in ("loss.csv", "loss_curve.png", "samples.png", "training_info.json", "REPORT.md"):
        assert os.path.isfile(os.path.join(report, name)), name
    info = json.load(open(os.path.join(report, "training_info.json")))
    assert info["steps"] == 6 and info["parameters"]["total"] > 0 and "--steps 6" in info["reproduce_command"]
    assert Image.open(os.path.join(report, "loss_curve.png")).size == (900, 500)
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "DiffservePixelDiTPipeline" and index["_diffserve_defaults"]["guidance_scale"] == 4.0
    with Omni(str(out), dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        image = omni.generate(
            {"prompt": "a red circle above a blue square", "seed": 0},
            OmniDiffusionSamplingParams(num_inference_steps=2),
        )[0].images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
def test_same_seed_same_weights(smoke_run, tmp_path):
    out, _ = smoke_run
    again = tmp_path / "again"
    train(again)
    assert digest(again) == digest(out)
    other = tmp_path / "other"
    train(other, "--seed", "1")
    assert digest(other) != digest(out)
