"""Memory probes: the device allocator's peak (per request and per stage) and this process's peak host
memory (reported after loading).

The GPU figures are PyTorch's own accounting (`torch.cuda.max_memory_allocated`): bytes held by
tensors, not what the caching allocator has reserved from the driver. Reading and resetting them
does not synchronize the device.
"""

from __future__ import annotations

import resource
import sys

import torch

GIB = 1024**3


class PeakMemory:
    """The device allocator's high-water mark since the last `reset()`."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def for_device(device: torch.device) -> "PeakMemory | None":
        """A probe for a CUDA device; None elsewhere (the CPU has no allocator statistics)."""
        return PeakMemory(device) if device.type == "cuda" else None

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def peak_host_rss_bytes() -> int:
    """The largest resident set this process has had (Linux and macOS; file pages it touched count)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"
