"""Latency of one default generation with the built-in demo model on this machine's CPU: 64x64, 20
steps, CFG, after loading; best and median of N runs. The README's "under a second per image on 2 CPU
cores" is this number (measured 0.90-0.95 s on an idle 2-core machine, 2026-11-26).

    python benchmarks/bench_demo_latency.py [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffserve import Omni
from diffserve.assets import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = "a red circle above a blue square"
    with Omni(default_model_path(), device="cpu", disable_progress_bar=True) as omni:
        omni.generate({"prompt": prompt, "seed": 0})  # warm-up
        times = []
        for seed in range(args.runs):
            start = time.perf_counter()
            omni.generate({"prompt": prompt, "seed": seed})
            times.append(time.perf_counter() - start)
    print(f"demo model, 64x64, 20 steps, CFG, {torch.get_num_threads()} threads: "
          f"best {min(times):.3f} s, median {statistics.median(times):.3f} s over {args.runs} runs")


if __name__ == "__main__":
    main()
