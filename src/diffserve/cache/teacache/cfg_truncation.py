"""TeaCache's CFG truncation (`cfg_truncation_step`): from a given step on, a pipeline with
classifier-free guidance runs its conditional branch alone and uses it unguided.

Truncating guidance at low noise is known to cost little (Kynkäänniemi et al. 2024, "Applying
Guidance in a Limited Interval Improves Sample and Distribution Quality"); here it halves the
transformer work of the late steps that a step cache still computes. On the demo model the guidance
(conditional minus unconditional prediction) of step 6 and step 12 have a cosine of 0.1-0.5, so a
late step gains less from reusing it than from dropping it (docs/cache.md).

The wrapper replaces the pipeline's `predict_guided_noise` (CFGParallelMixin) and reads the step
index from TeaCache's step counter; the engine config refuses batching="step" and CFG parallelism
with it (diffserve.config).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from diffserve.cache.teacache.hook import StepCounter


class CFGTruncation:
    def __init__(self, pipeline: nn.Module, first_step: int, counter: StepCounter):
        from diffserve.distributed.cfg_parallel import CFGParallelMixin

        if not isinstance(pipeline, CFGParallelMixin):
            raise ValueError(
                f"tea_cache cfg_truncation_step needs a pipeline with classifier-free guidance through "
                f"CFGParallelMixin; {type(pipeline).__name__} has none (leave it -1)"
            )
        self.pipeline = pipeline
        self.first_step = first_step
        self.counter = counter

    def install(self) -> None:
        original = self.pipeline.predict_guided_noise

        def predict_guided_noise(do_cfg: bool, scales, sizes, positive_kwargs: dict[str, Any], negative_kwargs):
            # The counter holds the index of the step whose transformer call comes next.
            if do_cfg and self.counter.next_step >= self.first_step:
                return original(False, scales, sizes, positive_kwargs, None)
            return original(do_cfg, scales, sizes, positive_kwargs, negative_kwargs)

        self._had_instance_attr = "predict_guided_noise" in self.pipeline.__dict__
        self._original = original
        self.pipeline.predict_guided_noise = predict_guided_noise

    def remove(self) -> None:
        if self._had_instance_attr:
            self.pipeline.predict_guided_noise = self._original
        else:
            del self.pipeline.predict_guided_noise
