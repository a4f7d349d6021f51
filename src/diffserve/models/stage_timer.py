"""Per-stage wall-clock timings and, on CUDA, peak device memory for DiffusionOutput.metrics.

`{stage}_s` is each stage's time; `{stage}_peak_gpu_bytes` the most memory tensors held during it, and
`peak_gpu_bytes` the most since the timer was made (gaps between stages included), which the worker
extends to the whole request.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch

from diffserve.memory import PeakMemory


class StageTimer:
    # Called with a stage's name as it starts, before its memory is measured (CPU offload lets go of
    # the encoders when the denoise stage starts: diffserve.offload).
    on_stage: Callable[[str], None] | None = None

    def __init__(self, device: torch.device, memory: PeakMemory | None = None):
        self.device = device
        self.memory = memory if memory is not None else PeakMemory.for_device(device)
        self.timings: dict[str, float] = {}
        self._peak = 0

    @contextmanager
    def stage(self, name: str):
        if self.on_stage is not None:
            self.on_stage(name)
        if self.memory is not None:
            # Resetting forgets the peak so far: keep it first, so the request's peak stays whole.
            self._peak = max(self._peak, self.memory.peak())
            self.memory.reset()
        start = time.perf_counter()
        yield
        # One sync per stage (not per step) so the numbers mean GPU time, not launch time. The compute
        # stream's only: it has waited for every copy the stage read, and a copy for a later stage on a
        # side stream (CPU offload fetches the next request's encoders while the VAE decodes) must not
        # hold this stage, nor the request, up.
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.timings[f"{name}_s"] = time.perf_counter() - start
        if self.memory is not None:
            stage_peak = self.memory.peak()
            self._peak = max(self._peak, stage_peak)
            self.timings[f"{name}_peak_gpu_bytes"] = stage_peak
            self.timings["peak_gpu_bytes"] = self._peak
