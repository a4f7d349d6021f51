#!/usr/bin/env python
"""What FP8 does to pictures, on trained weights (the built-in demo model): for each precision mode,
PSNR and SSIM of every image against the same caption and seed in the model's dtype, the detector's
accuracy and the time per image.

    python benchmarks/bench_quant_quality.py --device cuda --captions 20 --json-out q.json
    python benchmarks/bench_quant_quality.py --modes bf16 fp8 --device cuda

    python benchmarks/bench_quant_quality.py --device cpu --modes fp8 fp8:keep=attn_out "fp8:bf16_steps=4"

Modes: `bf16` (the baseline, first whatever is asked), `fp8` (quantization="fp8": the blocks' linear
layers), `fp8_attn` (attention_backend="cudnn_fp8"), `fp8+fp8_attn` (both). FP8 needs a GPU with FP8
tensor cores, except that `bf16` and the `fp8` modes also run on the CPU (torch._scaled_mm has a CPU
kernel); cudnn_fp8 needs Hopper or newer and nvidia-cudnn-frontend. The captions are the held-out
test captions, caption i with seed `--first-seed + i`, 64x64, 20 steps, CFG. On a model this small the
times are launch-bound and say nothing about FP8's speed (see bench_forward.py for that).

Candidate FP8 policies are `fp8:key=value,...`: the engine loads in bf16 and this script converts
`converted_layers` itself with the engine's Fp8LinearMethod, except
  keep=KIND+KIND     layers of these kinds stay bf16 (`KINDS`: qkv, attn_out, ff_up, ff_down, and text:
                     the text stream of joint blocks, which the demo model does not have);
  keep_blocks=I+I    these repeated blocks stay bf16 (call order; -1 is the last);
  bf16_steps=N       the first N of the 20 steps run in bf16 (the engine's `unquantized_steps`: the bf16
                     weights are kept beside the FP8 ones, so this one costs memory as well as speed).
For every FP8 mode the table gives its cost on FLUX.1-dev (`flux_bf16_share`): the share of the
transformer's linear-layer multiply-adds that would stay bf16 under the same policy, from the layer
shapes at 1024x1024 (4096 image + 512 text tokens); today's `fp8` leaves 0.04% (embedders, modulations).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

from bench_cache_quality import generate, psnr, ssim
from diffserve import Omni
from diffserve.assets import default_model_path
from diffserve.demo import detector, scenes
from diffserve.layers.quantization import Fp8LinearMethod, StepPrecision, check_fp8_supported, converted_layers
from diffserve.models.interface import discover_components, is_repeated_block

MODES = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "fp8_attn": {"attention_backend": "cudnn_fp8"},
    "fp8+fp8_attn": {"quantization": "fp8", "attention_backend": "cudnn_fp8"},
}


# A layer's kind, from its path inside its block: the demo model's and FLUX.1-dev's names. FLUX's
# single-stream blocks project attention and feed-forward out in one matmul (`proj_out`): ff_down.
KINDS = {
    "qkv": ("attn.to_qkv", "attn.add_qkv"),
    "attn_out": ("attn.to_out", "attn.to_add_out"),
    "ff_up": ("ff.proj_in", "ff_context.proj_in", "proj_mlp"),
    "ff_down": ("ff.proj_out", "ff_context.proj_out", "proj_out"),
    "text": ("attn.add_qkv", "attn.to_add_out", "ff_context.proj_in", "ff_context.proj_out"),
}
STEPS = 20  # the demo model's


def parse_policy(mode: str) -> dict | None:
    """`fp8:keep=attn_out+ff_down,keep_blocks=0+-1,bf16_steps=4` -> {"keep": [...], ...}; None for
    the engine's own modes."""
    if mode in MODES:
        return None
    name, _, settings = mode.partition(":")
    policy = {"keep": [], "keep_blocks": [], "bf16_steps": 0}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if name != "fp8" or key not in policy or not value:
            raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)} or fp8:key=value,... with keys "
                             f"{', '.join(policy)}")
        policy[key] = int(value) if key == "bf16_steps" else value.split("+")
    if unknown := set(policy["keep"]) - set(KINDS):
        raise ValueError(f"mode {mode!r}: unknown kind {sorted(unknown)}; kinds are {', '.join(KINDS)}")
    policy["keep_blocks"] = [int(i) for i in policy["keep_blocks"]]
    return policy


def policy_layers(transformer: nn.Module, policy: dict) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the `converted_layers` the policy converts, those it keeps in bf16)."""
    names = set(getattr(transformer, "_repeated_blocks", ()))
    blocks = [m for m in transformer.modules() if is_repeated_block(m, names)]
    kept_blocks = {i % len(blocks) for i in policy["keep_blocks"]}
    suffixes = tuple(s for kind in policy["keep"] for s in KINDS[kind])
    kept = {id(layer) for i, block in enumerate(blocks) for path, layer in block.named_modules()
            if i in kept_blocks or path in suffixes}
    layers = converted_layers(transformer)
    return [layer for layer in layers if id(layer) not in kept], [layer for layer in layers if id(layer) in kept]


def apply_policy(omni: Omni, policy: dict, device: str) -> None:
    """Convert the loaded bf16 denoisers' layers as the policy says, as the engine's `quantization`
    (and, for bf16_steps, its `unquantized_steps`) would, its checks included."""
    check_fp8_supported(torch.device(device))
    pipeline = omni.engine.executor.worker.pipeline  # one device: the engine runs in this process
    precision = StepPrecision(policy["bf16_steps"]) if policy["bf16_steps"] else None
    for transformer in discover_components(pipeline)["dit"].values():
        for layer in policy_layers(transformer, policy)[0]:
            layer.quant_method = Fp8LinearMethod(precision)
            layer.quant_method.process_weights(layer, torch.device(device))
    pipeline.step_precision = precision


def flux_bf16_share(policy: dict) -> float:
    """The share of FLUX.1-dev's linear multiply-adds at 1024x1024 that stay bf16 under `policy`:
    sum over bf16 layers of tokens x in x out, over the same sum for all layers. Tokens: 512 for the
    text-stream layers (context_embedder and the double blocks' add_qkv, to_add_out, ff_context), 4096
    for the other double-block layers, x_embedder and proj_out, 4608 in the single blocks, 1 for the
    modulations and the time/text/guidance embedders. bf16_steps=N adds that share of the steps."""
    from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig

    with torch.device("meta"):
        flux = FluxTransformer2DModel(FluxTransformerConfig(guidance_embeds=True))
    converted = policy_layers(flux, policy)[0]
    macs = {id(layer): _flux_tokens(path) * layer.weight.shape[0] * layer.weight.shape[1]
            for path, layer in flux.named_modules() if hasattr(layer, "quant_method")}
    layers_share = 1 - sum(macs[id(layer)] for layer in converted) / sum(macs.values())
    steps = policy["bf16_steps"] / STEPS
    return steps + (1 - steps) * layers_share


def _flux_tokens(path: str) -> int:
    if "norm" in path or "time_text_embed" in path:
        return 1
    if path == "context_embedder" or any(s in path for s in ("add_qkv", "to_add_out", "ff_context")):
        return 512
    return 4608 if path.startswith("single_transformer_blocks") else 4096


def flux_share(mode: str) -> float | None:
    """flux_bf16_share of the mode's linear layers; None for modes that leave them all bf16."""
    if mode in ("bf16", "fp8_attn"):
        return None
    return flux_bf16_share(parse_policy(mode) or {"keep": [], "keep_blocks": [], "bf16_steps": 0})


def run_mode(mode: str, captions: list[str], seeds: list[int], device: str) -> dict:
    policy = parse_policy(mode)
    engine = MODES[mode] if policy is None else {}
    with Omni(default_model_path(), dtype="bfloat16", device=device, disable_progress_bar=True, **engine) as omni:
        if policy is not None:
            apply_policy(omni, policy, device)
        generate(omni, captions[:1], [seeds[0] + 1000])  # warm-up
        images, times, _ = generate(omni, captions, seeds)
    return {"images": images, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES),
                        help=f"{', '.join(MODES)} or fp8:key=value,... (see above)")
    parser.add_argument("--captions", type=int, default=20, help="how many held-out test captions (of 20)")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    modes = ["bf16", *[m for m in args.modes if m != "bf16"]]
    for mode in modes:
        parse_policy(mode)  # a misspelt mode fails before any model loads
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
                     "detector_accuracy": detector.score_images(images, captions)[0],
                     "flux_bf16_share": flux_share(mode)})
    print(f"\n**Demo model, {len(captions)} held-out test captions (seeds {seeds[0]}-{seeds[-1]}), 64x64, 20 steps, "
          f"CFG; {args.device}, against bf16**\n")
    print("| mode | s / image | worst PSNR | median PSNR | mean PSNR | worst SSIM | detector accuracy | FLUX bf16 share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        share = "" if r["flux_bf16_share"] is None else f"{r['flux_bf16_share']:.2%}"
        print(f"| {r['mode']} | {r['seconds_per_image']:.3f} | {r['worst_psnr_db']:.1f} dB | {r['median_psnr_db']:.1f} dB | "
              f"{r['mean_psnr_db']:.1f} dB | {r['worst_ssim']:.3f} | {r['detector_accuracy']:.0%} | {share} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if
                       args.device == "cuda" else platform.processor(), "torch": torch.__version__,
                       "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
