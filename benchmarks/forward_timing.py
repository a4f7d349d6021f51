"""Timing and comparison helpers shared by the single-model forward benchmarks
(bench_flux_transformer.py, bench_wan_transformer.py)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    first_call_s: float  # includes compilation for compiled variants
    peak_mem_gib: float | None = None  # everything allocated, both models' weights included
    activation_mem_gib: float | None = None  # peak minus what was allocated before the forward
    times_ms: list[float] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn, device: torch.device, warmup: int, iters: int) -> Timing:
    """Median latency of fn() with warmup excluded: CUDA events on GPU, perf_counter elsewhere."""
    synchronize(device)
    start = time.perf_counter()
    fn()  # the first call pays for compilation / autotuning / allocator growth
    synchronize(device)
    first_call_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        events = []
        for _ in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            events.append((begin, end))
        torch.cuda.synchronize(device)
        times = [b.elapsed_time(e) for b, e in events]
        peak = torch.cuda.max_memory_allocated(device)
        mem = dict(peak_mem_gib=peak / 2**30, activation_mem_gib=(peak - base) / 2**30)
    else:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        mem = {}
    return Timing(statistics.median(times), min(times), first_call_s, times_ms=times, **mem)


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.float(), ref.float()
    return dict(
        rel_err=((ours - ref).norm() / ref.norm()).item(),
        max_abs_err=(ours - ref).abs().max().item(),
        ref_abs_max=ref.abs().max().item(),
        ours_finite=bool(torch.isfinite(ours).all()),
        ref_finite=bool(torch.isfinite(ref).all()),
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def report_and_exit_code(result: dict, markdown: str, json_out: str | None) -> int:
    """Print a benchmark's markdown table, write its JSON if asked; 0 if its checks passed."""
    print()
    print(markdown)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {json_out}")
    return 0 if result["passed"] else 1
