"""Each native family's scheduler steps without a host sync (CPU: `meta` stands for the GPU).

The schedule is set the way the pipeline sets it, then every step runs on `meta` latents under
HostSyncRecorder. tests/gpu/test_denoise_loop.py checks whole loops, transformer included, on a GPU;
this keeps the scheduler half of it in every CI run."""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from diffserve.assets import DEMO_MODEL_DIR
from diffserve.testing import load_pipeline
from diffserve.testing.host_syncs import HostSyncRecorder

META = torch.device("meta")
STEPS = 6
# How each pipeline sets its schedule (the arguments of its prepare_timesteps).
TIMESTEP_ARGS = {
    "demo": (STEPS,),
    "flux": (STEPS, 64),  # the image's token count sets FLUX's shift
    "qwen-image": (STEPS, 64),
    "sd3.5-medium": (STEPS, 64, 64),
    "wan2.1-t2v": (STEPS,),
}
# Stable Audio's schedule cannot be set on `meta` (its scheduler reads sigmas back to the host once,
# before the loop); its loop passed the GPU check.


def _step_all(scheduler, timesteps, latents) -> torch.Tensor:
    for t in timesteps:
        latents = scheduler.step(torch.tanh(latents), t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("family", TIMESTEP_ARGS)
def test_the_scheduler_steps_without_a_host_sync(tiny_checkpoint, family):
    pipeline = load_pipeline(DEMO_MODEL_DIR if family == "demo" else tiny_checkpoint(family))
    pipeline._execution_device = META
    timesteps = pipeline.prepare_timesteps(*TIMESTEP_ARGS[family])
    with HostSyncRecorder() as recorder:
        _step_all(pipeline.scheduler, timesteps, torch.zeros(1, 4, 8, 8, device=META))
    assert recorder.syncs == [], f"{type(pipeline.scheduler).__name__}: {sorted(set(recorder.syncs))}"


def test_the_recorder_sees_what_would_sync():
    """diffusers' own UniPC (which Wan's pipeline replaces) copies sigmas to the device and solves there."""
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(STEPS, device=META)
    scheduler.set_begin_index(0)
    with HostSyncRecorder() as recorder:
        _step_all(scheduler, scheduler.timesteps, torch.zeros(1, 4, 8, 8, device=META))
    assert {"aten::_to_copy", "aten::_linalg_check_errors"} <= set(recorder.syncs)
    x = torch.zeros(3, device=META)
    with HostSyncRecorder() as recorder:
        x + torch.tensor(2.0)  # a host scalar operand: no sync, as on CUDA
        torch.ones(3).to(META)
        for read in (x.cpu, x.sum().item, x.nonzero):  # recorded, then refused: `meta` holds no data
            with pytest.raises((NotImplementedError, RuntimeError)):
                read()
    assert recorder.syncs == ["aten::_to_copy", "aten::_to_copy", "aten::_local_scalar_dense", "aten::nonzero"]
