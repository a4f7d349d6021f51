"""HostUniPCScheduler against diffusers' UniPCMultistepScheduler: the same samples at every step.

Both run a whole schedule on the same start and a fixed non-linear stand-in for the transformer, in
float32 on the CPU. Ours computes its coefficients in float64 on the host, diffusers in float32 tensors,
so they differ by float32 rounding: measured at most 1.9e-6 over the cases below (tolerance 2e-5)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffserve.models.flow_match import set_timesteps
from diffserve.models.unipc import HostUniPCScheduler, host_stepping

TOLERANCE = 2e-5
WAN = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)


def _velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(1.5 * x) * (t / 1000.0) - 0.3 * x.roll(1, dims=-1)


def _run(scheduler, steps: int) -> list[torch.Tensor]:
    timesteps = set_timesteps(scheduler, steps, torch.device("cpu"))
    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    samples = []
    for t in timesteps:
        x = scheduler.step(_velocity(x, t), t, x, return_dict=False)[0]
        samples.append(x)
    return samples


@pytest.mark.parametrize("config", [
    {},  # Wan's: order 2, bh2, lower order at the end
    {"flow_shift": 5.0},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},  # bh1 to a zero sigma is NaN in diffusers
    {"disable_corrector": [0, 3]},
], ids=str)
@pytest.mark.parametrize("steps", [2, 10])
def test_every_step_matches_diffusers(config, steps):
    reference = UniPCMultistepScheduler(**{**WAN, **config})
    ours = host_stepping(copy.deepcopy(reference))
    assert isinstance(ours, HostUniPCScheduler)
    errors = [(a - b).abs().max().item() for a, b in zip(_run(ours, steps), _run(reference, steps))]
    assert len(errors) == steps and np.isfinite(errors).all()
    assert max(errors) <= TOLERANCE, errors


def test_a_reused_scheduler_starts_each_run_afresh():
    ours = host_stepping(UniPCMultistepScheduler(**WAN))
    assert all(torch.equal(a, b) for a, b in zip(_run(ours, 6), _run(ours, 6)))


@pytest.mark.parametrize("scheduler", [
    UniPCMultistepScheduler(num_train_timesteps=1000),  # epsilon prediction on a DDPM schedule
    UniPCMultistepScheduler(**WAN, thresholding=True),
    DPMSolverMultistepScheduler(),
], ids=["epsilon", "thresholding", "another_class"])
def test_configs_it_does_not_cover_keep_the_diffusers_scheduler(scheduler):
    assert host_stepping(scheduler) is scheduler
