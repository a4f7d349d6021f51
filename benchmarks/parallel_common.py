"""Shared driver for the whole-engine parallel benchmarks (bench_flux_parallel, bench_wan_parallel).

Each mode runs in a fresh engine: a short warm-up request (compilation, allocator), then timed
requests; the per-step time is the denoise stage time over the steps. Outputs are compared with the
first mode's (normally one GPU): relative L2 error and PSNR on the [0, 1] pixels.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch


def ensure_checkpoint(path: str, build: Callable[[str], None]) -> None:
    """Write the random-weight checkpoint once; later runs reuse it."""
    if not os.path.exists(os.path.join(path, "model_index.json")):
        start = time.perf_counter()
        build(path)
        print(f"wrote checkpoint to {path} in {time.perf_counter() - start:.1f} s", flush=True)


def run_mode(path: str, mode: str, engine_kwargs: dict, prompt, params: dict, steps: int, warmup_steps: int,
             repeats: int, warmup_output_type: str | None = None, compare_latents: bool = False) -> dict:
    """`warmup_output_type="latent"` skips the warm-up's decode (minutes for long videos).
    `compare_latents`: one more request returns the final latents, which are compared instead of the
    pixels (a random-weight VAE may saturate its output, hiding any difference)."""
    from diffserve import Omni, OmniDiffusionSamplingParams

    start = time.perf_counter()
    with Omni(path, dtype="bfloat16", disable_progress_bar=True, **engine_kwargs) as omni:
        load_s = time.perf_counter() - start
        warm_params = {**params, "output_type": warmup_output_type or params.get("output_type", "pil")}
        warm = omni.generate(prompt, OmniDiffusionSamplingParams(num_inference_steps=warmup_steps, **warm_params))[0]
        runs = []
        for _ in range(repeats):
            out = omni.generate(prompt, OmniDiffusionSamplingParams(num_inference_steps=steps, **params))[0]
            runs.append(out.metrics["denoise_s"] / steps * 1000)
        pixels = out.frames if out.frames is not None else out.images
        if compare_latents:
            latent = omni.generate(prompt, OmniDiffusionSamplingParams(
                num_inference_steps=steps, **{**params, "output_type": "latent"}))[0]
            pixels = latent.frames if latent.frames is not None else latent.images
    return {
        "mode": mode,
        "gpus": None,
        "load_s": load_s,
        "warmup_denoise_s": warm.metrics["denoise_s"],
        "step_ms": sorted(runs)[len(runs) // 2],
        "step_ms_all": runs,
        "decode_s": out.metrics.get("decode_s"),
        "e2e_s": out.metrics["e2e_s"],
        "cached_steps": out.metrics.get("cached_steps"),  # with a step cache: steps that reused it
        "pixels": pixels.float().cpu(),  # or the latents, with compare_latents
    }


def compare(results: list[dict]) -> list[dict]:
    """Drop the pixels; add speedup and output agreement against the first mode."""
    base = results[0]
    rows = []
    for r in results:
        diff = (r["pixels"] - base["pixels"]).flatten()
        peak = base["pixels"].abs().max()
        mse = diff.pow(2).mean().item()
        rows.append({k: v for k, v in r.items() if k != "pixels"} | {
            "speedup_vs_first": base["step_ms"] / r["step_ms"],
            "rel_err_vs_first": (diff.norm() / base["pixels"].flatten().norm()).item(),
            "max_abs_vs_first": diff.abs().max().item(),
            # Peak: the first mode's largest magnitude (1 for [0, 1] pixels).
            "psnr_vs_first_db": float("inf") if mse == 0 else 10 * torch.log10(peak**2 / mse).item(),
        })
    return rows


def report(rows: list[dict], title: str, args, json_out: str | None) -> None:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n**{title}**, {device}, torch {torch.__version__}\n")
    print("| mode | GPUs | per-step ms | speedup | efficiency | decode s | rel err | PSNR dB | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        decode = f"{row['decode_s']:.2f}" if row["decode_s"] is not None else "-"
        print(f"| {row['mode']} | {row['gpus']} | {row['step_ms']:.1f} | {row['speedup_vs_first']:.2f}x | "
              f"{row['speedup_vs_first'] / row['gpus']:.0%} | {decode} | {row['rel_err_vs_first']:.2e} | "
              f"{row['psnr_vs_first_db']:.1f} | {row['load_s']:.1f} |", flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=2)


def world_size(engine_kwargs: dict) -> int:
    from diffserve.config import DiffusionParallelConfig, PARALLEL_KEYS

    return DiffusionParallelConfig(**{k: v for k, v in engine_kwargs.items() if k in PARALLEL_KEYS}).world_size
