"""Classifier-free guidance as a pipeline mixin.

Pipelines call `predict_noise_maybe_with_cfg` and `scheduler_step_maybe_with_cfg` in their denoise
loop and never branch on parallelism themselves. With a CFG-parallel group of two ranks, each rank
runs one branch and the results are exchanged (multi-GPU runtime); otherwise both branches run here.
"""

from __future__ import annotations

from typing import Any

import torch



class CFGParallelMixin:
    def predict_noise(self, **kwargs: Any) -> torch.Tensor:
        """One transformer call; override when the transformer's call or output is non-standard."""
        return self.transformer(**kwargs)

    def combine_cfg_noise(
        self, positive: torch.Tensor, negative: torch.Tensor, true_cfg_scale: float
    ) -> torch.Tensor:
        return negative + true_cfg_scale * (positive - negative)

    def predict_noise_maybe_with_cfg(
        self,
        do_true_cfg: bool,
        true_cfg_scale: float,
        positive_kwargs: dict[str, Any],
        negative_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        if not do_true_cfg:
            return self.predict_noise(**positive_kwargs)
        positive = self.predict_noise(**positive_kwargs)
        negative = self.predict_noise(**negative_kwargs)
        return self.combine_cfg_noise(positive, negative, true_cfg_scale)

    def scheduler_step_maybe_with_cfg(
        self, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, do_true_cfg: bool
    ) -> torch.Tensor:
        # Every rank holds the combined prediction, so every rank steps its own scheduler identically.
        return self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
