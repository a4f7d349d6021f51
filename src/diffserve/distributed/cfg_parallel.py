"""Classifier-free guidance as a pipeline mixin.

The shared denoise step (diffserve.models.denoise) calls `predict_guided_noise`, for one request or
several stacked in one batch; pipelines never branch on parallelism themselves. Every rank holds the
combined prediction, so every rank steps its own scheduler identically. Three ways to run the two
branches:

- CFG parallel (cfg_parallel_size=2): CFG rank 0 runs the positive branch, rank 1 the negative one,
  and the predictions are exchanged with one all-gather;
- batched: a pipeline that lists its per-sample transformer inputs in `cfg_batched_inputs` gets both
  branches in one forward of twice the batch (fewer, larger kernels);
- otherwise two forwards, one after the other.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from diffserve.distributed.parallel_state import get_cfg_group


class CFGParallelMixin:
    # Transformer keyword inputs that carry a batch dimension; every other input must be the same
    # object in both branches (e.g. position ids). Empty: branches are never batched.
    cfg_batched_inputs: ClassVar[tuple[str, ...]] = ()

    def predict_noise(self, **kwargs: Any) -> torch.Tensor:
        """One transformer call; override when the transformer's call or output is non-standard."""
        return self.transformer(**kwargs)

    def combine_cfg_noise(
        self, positive: torch.Tensor, negative: torch.Tensor, true_cfg_scale: float
    ) -> torch.Tensor:
        return negative + true_cfg_scale * (positive - negative)

    def predict_guided_noise(
        self,
        do_cfg: bool,
        scales: list[float],
        sizes: list[int],
        positive_kwargs: dict[str, Any],
        negative_kwargs: dict[str, Any] | None,
    ) -> list[torch.Tensor]:
        """The noise prediction of each request in the batch (`sizes[i]` samples each, in order; one
        request alone is the batch), guided with its own CFG scale `scales[i]` when `do_cfg`. CFG
        combines elementwise, so a request's slice is what it gets alone."""
        if not do_cfg:
            return list(self.predict_noise(**positive_kwargs).split(sizes))
        positive, negative = self.predict_cfg_branches(positive_kwargs, negative_kwargs)
        return [
            self.combine_cfg_noise(pos, neg, scale)
            for pos, neg, scale in zip(positive.split(sizes), negative.split(sizes), scales)
        ]

    def predict_cfg_branches(
        self, positive_kwargs: dict[str, Any], negative_kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) predictions, both on every rank. A guidance variant that needs the
        branches themselves (SD3's skip-layer guidance) overrides predict_guided_noise and starts
        from here."""
        cfg = get_cfg_group()
        if cfg.world_size > 1:
            mine = self.predict_noise(**(positive_kwargs if cfg.rank_in_group == 0 else negative_kwargs))
            positive, negative = cfg.all_gather(mine.unsqueeze(0), dim=0).unbind(0)
            return positive, negative
        batched = self._batch_cfg_kwargs(positive_kwargs, negative_kwargs)
        if batched is not None:
            positive, negative = self.predict_noise(**batched).chunk(2)
            return positive, negative
        return self.predict_noise(**positive_kwargs), self.predict_noise(**negative_kwargs)

    def _batch_cfg_kwargs(self, positive: dict[str, Any], negative: dict[str, Any]) -> dict[str, Any] | None:
        """Both branches as one batch, or None if their inputs cannot be stacked (e.g. text lengths differ)."""
        if not self.cfg_batched_inputs:
            return None
        if positive.keys() != negative.keys():
            raise ValueError(f"CFG branches take different inputs: {sorted(positive)} vs {sorted(negative)}")
        batched = {}
        for key, pos in positive.items():
            neg = negative[key]
            if key in self.cfg_batched_inputs and isinstance(pos, torch.Tensor):
                if pos.shape != neg.shape:
                    return None
                batched[key] = torch.cat([pos, neg])
            elif pos is neg:
                batched[key] = pos
            elif key in self.cfg_batched_inputs and (pos is None or neg is None):
                return None  # e.g. an attention mask that only the padded branch needs
            else:
                raise ValueError(
                    f"CFG input {key!r} differs between the branches but is not in {type(self).__name__}."
                    f"cfg_batched_inputs; add it there if it has a batch dimension"
                )
        return batched
