"""Per-stage wall-clock timings for DiffusionOutput.metrics."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        # One device sync per stage (not per step) so the numbers mean GPU time, not launch time.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[f"{name}_s"] = time.perf_counter() - start
