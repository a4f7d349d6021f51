"""Each native family's denoise loop runs without a host sync (CPU: `meta` stands for the GPU).

`denoise_loop_syncs` encodes on the CPU, then runs every step (transformer calls with CFG, the
scheduler) on `meta` under HostSyncRecorder. tests/gpu/test_denoise_loop.py checks the same on a GPU
with torch.cuda.set_sync_debug_mode; this keeps the check in every CI run."""

import pytest
import torch

from diffserve import OmniDiffusionSamplingParams
from diffserve.assets import DEMO_MODEL_DIR
from diffserve.testing import load_pipeline, pipeline_request
from diffserve.testing.conformance import sample_image
from diffserve.testing.host_syncs import HostSyncRecorder, denoise_loop_syncs

META = torch.device("meta")
STEPS = 3
# CFG on in each. Stable Audio is left out: its SDE noise, drawn by `begin`, lives in its scheduler
# (outside the state this moves to `meta`); its loop passed the GPU check.
FAMILIES = {
    "demo": {"guidance_scale": 4.0},
    "flux": {"guidance_scale": 4.0},
    "wan2.1-t2v": {"guidance_scale": 4.0},
    "wan2.2-t2v": {"guidance_scale": 4.0},  # two experts, switched by the schedule
    "qwen-image": {"true_cfg_scale": 4.0, "negative_prompt": "blurry"},
    "sd3.5-medium": {"guidance_scale": 4.0},
}
# Families that take an input image (image-to-video, editing).
IMAGE_FAMILIES = {
    "flux-kontext": {"guidance_scale": 4.0},
    "wan2.1-i2v": {"guidance_scale": 4.0},
    "wan2.2-i2v": {"guidance_scale": 4.0},
    "wan2.2-ti2v-i2v": {"guidance_scale": 4.0},  # the image's latents replace the first frame's
    "qwen-image-edit": {"true_cfg_scale": 4.0, "negative_prompt": "blurry"},
    "qwen-image-edit-plus": {"true_cfg_scale": 4.0, "negative_prompt": "blurry"},
}


def _loop_syncs(tiny_checkpoint, family: str, prompts=("a red circle",)) -> list[str]:
    pipeline = load_pipeline(DEMO_MODEL_DIR if family == "demo" else tiny_checkpoint(family))
    params = OmniDiffusionSamplingParams(seed=0, num_inference_steps=STEPS,
                                         **FAMILIES.get(family) or IMAGE_FAMILIES[family])
    if family in IMAGE_FAMILIES:
        prompts = [{"prompt": p, "image": sample_image(64, 64, 0)} for p in prompts]
    return denoise_loop_syncs(pipeline, *(pipeline_request(pipeline, p, params) for p in prompts))


@pytest.mark.parametrize("family", [*FAMILIES, *IMAGE_FAMILIES])
def test_the_denoise_loop_runs_without_a_host_sync(tiny_checkpoint, family):
    syncs = _loop_syncs(tiny_checkpoint, family)
    assert syncs == [], f"{family}: {sorted(set(syncs))}"


@pytest.mark.parametrize("family", ["flux", "wan2.1-t2v", "qwen-image"])
def test_requests_stepped_together_run_without_a_host_sync(tiny_checkpoint, family):
    """Step-level batching: two requests in each call, text of different lengths (padded and masked)."""
    syncs = _loop_syncs(tiny_checkpoint, family, ("a red circle", "a small green square above a large blue circle"))
    assert syncs == [], f"{family}: {sorted(set(syncs))}"


def test_diffusers_unipc_would_sync_every_step(tiny_checkpoint, monkeypatch):
    """Wan's loop with diffusers' own UniPC (what the pipeline replaced) shows its syncs."""
    monkeypatch.setattr("diffserve.models.wan.pipeline_wan.host_stepping", lambda scheduler: scheduler)
    assert "aten::_to_copy" in _loop_syncs(tiny_checkpoint, "wan2.1-t2v")


def test_the_recorder_sees_what_would_sync():
    x = torch.zeros(3, device=META)
    with HostSyncRecorder() as recorder:
        x + torch.tensor(2.0)  # a host scalar operand: no sync, as on CUDA
        torch.ones(3).to(META)
        for read in (x.cpu, x.sum().item, x.nonzero):  # recorded, then refused: `meta` holds no data
            with pytest.raises((NotImplementedError, RuntimeError)):
                read()
    assert recorder.syncs == ["aten::_to_copy", "aten::_to_copy", "aten::_local_scalar_dense", "aten::nonzero"]
