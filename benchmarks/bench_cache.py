"""Step caching through the whole engine: per-step time of DBCache (cache-dit, F1B0) and TeaCache vs
no cache on FLUX.1-dev, with the steps each request skipped and the image distance to the uncached run.

Which steps a cache skips depends on the inputs, so every mode runs the same requests (the same
prompts and seeds, one per repeat) and reports each request's cached-step count; the step time is the
median over the repeats of the denoise stage time / steps. Each mode runs in a fresh engine after a
2-step warm-up (regional torch.compile, unless --eager). With random weights the skip decisions are
not those of the real model: the counts say what this run skipped, not what FLUX.1-dev would.

Modes: `none`, `cache_dit` and `tea_cache` at FLUX's defaults (docs/cache.md: DBCache F1B0, W4, MC3,
residual_diff_threshold 0.24; TeaCache rel_l1_thresh 0.25, 1 warm-up step; before the per-model
defaults, RESULTS.md's run used 0.2), or `cache_dit@R` / `tea_cache@T` with another threshold
(TeaCache4FLUX documents 0.25, 0.4, 0.6, 0.8 for FLUX.1-dev).

GPU (one card, bf16, the real FLUX.1-dev transformer with random weights; the checkpoint is written
by bench_flux_parallel.build_checkpoint on first use):

    python benchmarks/bench_cache.py --ckpt /tmp/flux-bench --modes none,cache_dit,tea_cache,tea_cache@0.4 \
        --json-out benchmarks/results/cache.json

CPU smoke test (a tiny random FLUX, seconds):

    python benchmarks/bench_cache.py --config tiny --size 64 --steps 8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

THRESHOLD_KEYS = {"cache_dit": "residual_diff_threshold", "tea_cache": "rel_l1_thresh"}


def parse_mode(mode: str) -> tuple[str | None, dict]:
    """'none' | 'cache_dit' | 'tea_cache', optionally '@threshold' -> (cache_backend, cache_config)."""
    backend, _, threshold = mode.partition("@")
    if backend == "none":
        if threshold:
            raise ValueError("mode 'none' takes no threshold")
        return None, {}
    if backend not in THRESHOLD_KEYS:
        raise ValueError(f"unknown mode {mode!r}; use none, cache_dit[@R] or tea_cache[@T]")
    return backend, ({THRESHOLD_KEYS[backend]: float(threshold)} if threshold else {})


def ensure_checkpoint(args) -> str:
    if args.config == "tiny":
        from diffserve.testing import make_tiny_checkpoint

        return make_tiny_checkpoint("flux", args.ckpt or tempfile.mkdtemp(prefix="tiny-flux-"))
    if not os.path.exists(os.path.join(args.ckpt, "model_index.json")):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_flux_parallel import build_checkpoint

        start = time.perf_counter()
        build_checkpoint(args.ckpt)
        print(f"wrote checkpoint to {args.ckpt} in {time.perf_counter() - start:.1f} s", flush=True)
    return args.ckpt


def run_mode(path: str, mode: str, args) -> dict:
    from diffserve import Omni, OmniDiffusionSamplingParams

    backend, cache_config = parse_mode(mode)
    prompt = {"prompt": "a red fox in the snow, detailed fur, golden hour", "negative_prompt": "blurry, low quality"}
    params = dict(height=args.size, width=args.size, max_sequence_length=args.max_sequence_length,
                  true_cfg_scale=args.true_cfg_scale, output_type="pt")
    engine = dict(dtype=args.dtype, device=args.device, enforce_eager=args.eager, disable_progress_bar=True)
    if backend is not None:
        engine.update(cache_backend=backend, cache_config=cache_config)
    start = time.perf_counter()
    with Omni(path, **engine) as omni:
        load_s = time.perf_counter() - start
        omni.generate({**prompt, "seed": 1000}, OmniDiffusionSamplingParams(num_inference_steps=2, **params))
        runs = []
        for seed in range(args.repeats):
            out = omni.generate({**prompt, "seed": seed},
                                OmniDiffusionSamplingParams(num_inference_steps=args.steps, **params))[0]
            runs.append({
                "seed": seed,
                "step_ms": out.metrics["denoise_s"] / args.steps * 1000,
                "cached_steps": out.metrics.get("cached_steps", 0),
                "e2e_s": out.metrics["e2e_s"],
                "images": out.images.float().cpu(),
            })
    return {"mode": mode, "backend": backend, "cache_config": cache_config, "load_s": load_s, "runs": runs}


def image_distance(images: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (images - reference).flatten()
    mse = diff.pow(2).mean().item()
    return {
        "rel_l2": (diff.norm() / reference.flatten().norm()).item(),
        "psnr_db": float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item(),
    }


def summarize(results: list[dict]) -> list[dict]:
    base = results[0]
    base_step = statistics.median(r["step_ms"] for r in base["runs"])
    rows = []
    for result in results:
        step_ms = statistics.median(r["step_ms"] for r in result["runs"])
        distances = [image_distance(r["images"], b["images"]) for r, b in zip(result["runs"], base["runs"])]
        rows.append({
            "mode": result["mode"],
            "cache_config": result["cache_config"],
            "step_ms": step_ms,
            "step_ms_all": [r["step_ms"] for r in result["runs"]],
            "speedup_vs_first": base_step / step_ms,
            "cached_steps": [r["cached_steps"] for r in result["runs"]],
            "e2e_s": statistics.median(r["e2e_s"] for r in result["runs"]),
            "psnr_db_vs_first": [d["psnr_db"] for d in distances],
            "rel_l2_vs_first": [d["rel_l2"] for d in distances],
            "load_s": result["load_s"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["dev", "tiny"], default="dev",
                        help="dev: real FLUX.1-dev shapes (GPU); tiny: a tiny random FLUX (CPU smoke test)")
    parser.add_argument("--ckpt", default=None, help="checkpoint folder (dev default: /tmp/flux-bench)")
    parser.add_argument("--modes", default="none,cache_dit,tea_cache",
                        help="comma-separated; the first is the baseline")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per mode, seeds 0..repeats-1")
    parser.add_argument("--true-cfg-scale", type=float, default=1.0,
                        help="> 1: true CFG with a negative prompt (both branches in one batch)")
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (dev), float32 (tiny)")
    parser.add_argument("--device", default=None, help="default: cuda (dev), cpu (tiny)")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    tiny = args.config == "tiny"
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    args.device = args.device or ("cpu" if tiny else "cuda")
    if tiny:
        args.max_sequence_length = min(args.max_sequence_length, 16)
    elif args.ckpt is None:
        args.ckpt = "/tmp/flux-bench"
    modes = args.modes.split(",")
    for mode in modes:
        parse_mode(mode)  # fail on a typo before anything is built

    path = ensure_checkpoint(args)
    results = []
    for mode in modes:
        result = run_mode(path, mode, args)
        steps = statistics.median(r["step_ms"] for r in result["runs"])
        print(f"{mode}: load {result['load_s']:.1f} s, step {steps:.1f} ms, "
              f"cached steps {[r['cached_steps'] for r in result['runs']]}", flush=True)
        results.append(result)
    rows = summarize(results)

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"\n**FLUX.1-{args.config} pipeline, {args.size}x{args.size}, {args.steps} steps, true CFG "
          f"{args.true_cfg_scale}**, {device}, {args.dtype}, torch {torch.__version__}, "
          f"{'eager' if args.eager or device == 'cpu' else 'regional torch.compile'}, seeds 0..{args.repeats - 1}\n")
    print(f"| mode | per-step ms | speedup | cached steps (of {args.steps}) per seed | PSNR dB vs {modes[0]} |")
    print("|---|---:|---:|---|---|")
    for row in rows:
        psnr = ", ".join("inf" if p == float("inf") else f"{p:.1f}" for p in row["psnr_db_vs_first"])
        print(f"| {row['mode']} | {row['step_ms']:.1f} | {row['speedup_vs_first']:.2f}x | "
              f"{', '.join(map(str, row['cached_steps']))} | {psnr} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
