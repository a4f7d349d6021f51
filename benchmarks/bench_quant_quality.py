#!/usr/bin/env python
"""What FP8 does to pictures, on trained weights (the built-in demo model): for each precision mode,
PSNR and SSIM of every image against the same caption and seed in the model's dtype, the detector's
accuracy and the time per image.

    python benchmarks/bench_quant_quality.py --device cuda --captions 20 --json-out q.json
    python benchmarks/bench_quant_quality.py --modes bf16 fp8 --device cuda

Modes: `bf16` (the baseline, first whatever is asked), `fp8` (quantization="fp8": the blocks' linear
layers), `fp8_attn` (attention_backend="cudnn_fp8"), `fp8+fp8_attn` (both). FP8 needs a GPU with FP8
tensor cores; cudnn_fp8 needs Hopper or newer and nvidia-cudnn-frontend. The captions are the held-out
test captions, caption i with seed `--first-seed + i`, 64x64, 20 steps, CFG. On a model this small the
times are launch-bound and say nothing about FP8's speed (see bench_forward.py for that).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from bench_cache_quality import generate, psnr, ssim
from diffserve import Omni
from diffserve.assets import default_model_path
from diffserve.demo import detector, scenes

MODES = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "fp8_attn": {"attention_backend": "cudnn_fp8"},
    "fp8+fp8_attn": {"quantization": "fp8", "attention_backend": "cudnn_fp8"},
}


def run_mode(mode: str, captions: list[str], seeds: list[int], device: str) -> dict:
    with Omni(default_model_path(), dtype="bfloat16", device=device, disable_progress_bar=True, **MODES[mode]) as omni:
        generate(omni, captions[:1], [seeds[0] + 1000])  # warm-up
        images, times, _ = generate(omni, captions, seeds)
    return {"images": images, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--captions", type=int, default=20, help="how many held-out test captions (of 20)")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    modes = ["bf16", *[m for m in args.modes if m != "bf16"]]
    captions = scenes.held_out_captions("test")[: args.captions]
    seeds = [args.first_seed + i for i in range(len(captions))]
    runs = {mode: run_mode(mode, captions, seeds, args.device) for mode in modes}
    baseline = runs["bf16"]["images"]
    rows = []
    for mode in modes:
        images = runs[mode]["images"]
        psnrs = [psnr(a, b) for a, b in zip(images, baseline)]
        rows.append({"mode": mode, "seconds_per_image": runs[mode]["seconds"],
                     "psnr_db": psnrs, "worst_psnr_db": min(psnrs), "mean_psnr_db": float(np.mean([min(p, 99) for p in psnrs])),
                     "median_psnr_db": float(np.median(psnrs)),
                     "worst_ssim": min(ssim(a, b) for a, b in zip(images, baseline)),
                     "detector_accuracy": detector.score_images(images, captions)[0]})
    print(f"\n**Demo model, {len(captions)} held-out test captions (seeds {seeds[0]}-{seeds[-1]}), 64x64, 20 steps, "
          f"CFG; {args.device}, against bf16**\n")
    print("| mode | s / image | worst PSNR | median PSNR | mean PSNR | worst SSIM | detector accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds_per_image']:.3f} | {r['worst_psnr_db']:.1f} dB | {r['median_psnr_db']:.1f} dB | "
              f"{r['mean_psnr_db']:.1f} dB | {r['worst_ssim']:.3f} | {r['detector_accuracy']:.0%} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if
                       args.device == "cuda" else platform.processor(), "torch": torch.__version__,
                       "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
