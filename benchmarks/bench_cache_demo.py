"""Step caching on the built-in demo model (trained weights, so quality means something): per-image
time, PSNR against the uncached image, and the detector's accuracy, uncached vs Cache-DiT (DBCache)
at several thresholds. Runs on a CPU in a couple of minutes.

    python benchmarks/bench_cache_demo.py [--thresholds 0.08,0.12,0.24] [--seeds 2] [--json-out r.json]

TeaCache uses the coefficients the demo transformer declares (fitted by
scripts/fit_teacache_coefficients.py on the validation captions; the test captions measured here were
not used for the fit).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.assets import default_model_path
from diffserve.demo import detector, scenes


def generate(omni: Omni, captions: list[str], seeds: list[int]) -> tuple[np.ndarray, float, list[int]]:
    """Images, the median seconds per image (the CPU's load drifts; a median resists it), cached steps."""
    images, times, cached = [], [], []
    for caption in captions:
        for seed in seeds:
            start = time.perf_counter()
            out = omni.generate(caption, OmniDiffusionSamplingParams(seed=seed))[0]
            times.append(time.perf_counter() - start)
            images.append(np.asarray(out.images[0]))
            cached.append(out.metrics.get("cached_steps", 0))
    return np.stack(images), float(np.median(times)), cached


def engine_kwargs(name: str, threshold: float | None, args) -> dict:
    if threshold is None:
        return {}
    if name.startswith("tea_cache"):
        return {"cache_backend": "tea_cache", "cache_config": {"rel_l1_thresh": threshold}}
    config = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": threshold}
    if args.warmup_steps is not None:
        config["max_warmup_steps"] = args.warmup_steps
    return {"cache_backend": "cache_dit", "cache_config": config}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", default="0.08,0.12,0.24")
    parser.add_argument("--tea-thresholds", default="0.1,0.2,0.3",
                        help="TeaCache rel_l1_thresh values (the model's fitted coefficients)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of all modes")
    parser.add_argument("--warmup-steps", type=int, default=None, help="cache-dit max_warmup_steps (default 4)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    captions = scenes.held_out_captions("test")
    seeds = list(range(args.seeds))
    modes = [("none", None)] + [(f"cache_dit@{t}", float(t)) for t in args.thresholds.split(",") if t]
    modes += [(f"tea_cache@{t}", float(t)) for t in args.tea_thresholds.split(",") if t]
    # Every mode runs once per round, rounds alternating, so a drift in the CPU's speed (seen: 20%
    # between identical runs) hits all modes alike; a mode's time is its median over all rounds.
    times: dict[str, list[float]] = {name: [] for name, _ in modes}
    results: dict[str, tuple[np.ndarray, list[int]]] = {}
    for _ in range(args.rounds):
        for name, threshold in modes:
            with Omni(default_model_path(), dtype="float32", device="cpu", disable_progress_bar=True,
                      **engine_kwargs(name, threshold, args)) as omni:
                generate(omni, captions[:3], [0])  # warm-up
                images, seconds, cached = generate(omni, captions, seeds)
            times[name].append(seconds)
            results[name] = (images, cached)
    rows, baseline = [], results["none"][0]
    for name, _ in modes:
        images, cached = results[name]
        seconds = float(np.median(times[name]))
        rows.append({
            "mode": name,
            "seconds_per_image": seconds,
            "speedup": float(np.median(times["none"])) / seconds,
            "mean_cached_steps": float(np.mean(cached)),
            "psnr_db_vs_uncached": float(np.mean([psnr(a, b) for a, b in zip(images, baseline)])),
            "detector_accuracy": detector.score_images(images, [c for c in captions for _ in seeds])[0],
        })
        print(rows[-1], flush=True)

    print(f"\n**Demo model, {len(captions)} held-out captions x {len(seeds)} seeds, 64x64, 20 steps, CFG**, "
          f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n")
    print("| mode | s / image | speedup | cached steps (of 20) | PSNR vs uncached | detector accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds_per_image']:.3f} | {r['speedup']:.2f}x | {r['mean_cached_steps']:.1f} | "
              f"{r['psnr_db_vs_uncached']:.1f} dB | {r['detector_accuracy']:.0%} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
