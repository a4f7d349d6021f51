"""UniPC on flow sigmas with its per-step coefficients on the host: Wan's sampler without host syncs.

diffusers' UniPCMultistepScheduler keeps the sigma table on the CPU but does each step's scalar
arithmetic on the sample's device: it copies sigmas there (a blocking copy) and, for the corrector of
order 2 and up, solves a small linear system there (`torch.linalg.solve` checks its result on the
host). Each is a host sync: the host waits for the whole transformer forward before it can queue the
next step. `HostUniPCScheduler` is the same scheduler (same config, timesteps, sigmas and state) whose
`step` computes every coefficient from the sigma table in float64 on the host and touches the device
only to combine tensors. The arithmetic is UniPC's B(h) predictor-corrector (Zhao et al. 2023, "UniPC:
A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models") in data prediction
form, with alpha = 1 - sigma as flow matching defines it.

`host_stepping(scheduler)` swaps it in where the config is one it covers (the one Wan checkpoints
ship: flow sigmas, flow prediction, data prediction, no thresholding, no custom predictor) and
returns any other scheduler unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput


def host_stepping(scheduler):
    """`scheduler` as a HostUniPCScheduler when its config is one that covers, else unchanged."""
    if type(scheduler) is not UniPCMultistepScheduler:
        return scheduler
    config = scheduler.config
    covered = (
        config.use_flow_sigmas
        and config.prediction_type == "flow_prediction"
        and config.predict_x0
        and not config.thresholding
        and config.solver_type in ("bh1", "bh2")
        and not getattr(scheduler, "solver_p", None)
    )
    return HostUniPCScheduler.from_config(config) if covered else scheduler


def _lambda(sigma: np.float64) -> np.float64:
    """Half the log signal-to-noise ratio, log(alpha / sigma) with alpha = 1 - sigma (inf at sigma 0)."""
    return np.log(1.0 - sigma) - np.log(sigma)


class HostUniPCScheduler(UniPCMultistepScheduler):
    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        # Read once per run, outside the loop (diffusers keeps the table on the CPU: no device read).
        self._host_sigmas = self.sigmas.detach().cpu().double().numpy()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("the scheduler has no timesteps: call set_timesteps first")
        if self.step_index is None:
            self._init_step_index(timestep)  # with a begin index set (flow_match.set_timesteps), no search
        k = self.step_index
        x0 = sample - float(self._host_sigmas[k]) * model_output  # the data prediction from a flow prediction

        corrects = k > 0 and (k - 1) not in self.disable_corrector and self.last_sample is not None
        if corrects:  # UniC: refine this sample with the new prediction, at the order the last step used
            history = self.model_outputs[::-1][: self.this_order]  # m0 (step k-1), m1 (k-2), ...
            sample = self._update(self.last_sample, history, k - 1, k, self.this_order, corrector_target=x0)

        self.model_outputs = [*self.model_outputs[1:], x0]
        self.timestep_list = [*self.timestep_list[1:], timestep]
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self.timesteps) - k)
        self.this_order = min(order, self.lower_order_nums + 1)  # fewer past predictions while warming up
        self.last_sample = sample

        history = self.model_outputs[::-1][: self.this_order]  # m0 (step k), m1 (k-1), ...
        prev_sample = self._update(sample, history, k, k + 1, self.this_order)  # UniP

        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    # IEEE arithmetic as torch does it, silently: the last step reaches sigma 0, where lambda is inf.
    @np.errstate(divide="ignore", invalid="ignore")
    def _update(self, x, history, s0: int, t: int, order: int, corrector_target=None) -> torch.Tensor:
        """From sample `x` at step `s0` to step `t` with data predictions `history` (newest first, the
        first at `s0`): the predictor, or with `corrector_target` (the prediction at `t`) the corrector."""
        sigmas = self._host_sigmas
        sigma_t, sigma_s0 = sigmas[t], sigmas[s0]
        alpha_t = 1.0 - sigma_t
        h = _lambda(sigma_t) - _lambda(sigma_s0)
        m0 = history[0]
        # Earlier predictions enter as divided differences at their log-SNR distance from s0.
        rks = [(_lambda(sigmas[s0 - i]) - _lambda(sigma_s0)) / h for i in range(1, order)]
        differences = [(m - m0) / float(rk) for m, rk in zip(history[1:order], rks)]

        hh = -h  # data prediction integrates in -lambda
        h_phi_1 = np.expm1(hh)
        b_h = hh if self.config.solver_type == "bh1" else np.expm1(hh)
        rks = np.array([*rks, 1.0])
        powers, rhs, h_phi_k, factorial = [], [], h_phi_1 / hh - 1.0, 1.0
        for i in range(1, order + 1):
            powers.append(rks ** (i - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        powers, rhs = np.stack(powers), np.array(rhs)

        base = float(sigma_t / sigma_s0) * x - float(alpha_t * h_phi_1) * m0
        if corrector_target is None:
            if not differences:
                return base.to(x.dtype)
            rhos = [0.5] if order == 2 else np.linalg.solve(powers[:-1, :-1], rhs[:-1])
            residual = sum(float(r) * d for r, d in zip(rhos, differences))
        else:
            rhos = [0.5] if order == 1 else np.linalg.solve(powers, rhs)
            residual = float(rhos[-1]) * (corrector_target - m0)
            for r, d in zip(rhos[:-1], differences):
                residual = residual + float(r) * d
        return (base - float(alpha_t * b_h) * residual).to(x.dtype)
