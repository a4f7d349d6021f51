#!/usr/bin/env python
"""Unmerged LoRA: what an active adapter adds to one FLUX.1 transformer forward (one denoise step
without CFG), at rank 16 and 64, and two stacked.

Builds diffserve's FluxTransformer2DModel in the real FLUX.1-dev shape with random weights, writes
random adapters in diffusers' layout (safetensors, the names `pipe.save_lora_weights` writes) and
loads them through the engine's path (diffserve.lora.LoRAManager: the model's loading tables, fused
q/k/v, this rank's shards). Then times the forward with no adapter resident, with adapters resident
but none active, and with each selection active, eager and (with --compile) regionally compiled. The
overhead is reported against the base forward, next to the share of FLOPs the adapter adds.

    # the acceptance run: real FLUX.1-dev shape, bf16, one GPU (~28 GB)
    python benchmarks/bench_lora.py --config dev --compile --json-out lora_dev.json
    # smoke test on CPU in seconds
    python benchmarks/bench_lora.py --config tiny --device cpu --dtype float32 \
        --height 64 --width 64 --text-len 16 --iters 3 --warmup 1 --ranks 4 8

`--targets attention` adapts the attention projections only (q, k, v, out of both streams and the
single blocks' q, k, v); `all` (default) every attention, MLP and output projection, as broad
adapters do. Exits 1 if an output is not finite, if a resident but inactive adapter changes the
output, or if an active one leaves it unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import asdict

import torch
import torch.nn as nn

from bench_flux_transformer import CONFIGS, make_inputs
from forward_timing import compare, device_name, report_and_exit_code, synchronize, time_forward

# diffusers module names (inside each block) an adapter targets.
DOUBLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out"]
DOUBLE_MLP = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v"]
SINGLE_REST = ["proj_mlp", "proj_out"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="dev")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (multiple of 16)")
    p.add_argument("--text-len", type=int, default=512, help="T5 tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="one adapter per rank")
    p.add_argument("--targets", choices=["all", "attention"], default="all")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time with regional torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.height % 16 or args.width % 16:
        p.error("--height and --width must be multiples of 16 (VAE /8, then 2x2 patches)")
    return args


# -- model and adapters ------------------------------------------------------------------------------


class Pipeline(nn.Module):
    """Just a transformer where a pipeline keeps it (the LoRA manager finds denoisers there)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer


def build_model(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Our FLUX transformer with random weights: linears at nn.Linear's scale (1/sqrt(fan_in)), norm
    weights near 1, other 1-D parameters near 0, so activations stay sane over all blocks."""
    from diffserve.layers.attention import select_attention_backend, set_attention_backend
    from diffserve.loader.diffusers_loader import materialize_meta_tensors
    from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig

    with torch.device("meta"):
        model = FluxTransformer2DModel(FluxTransformerConfig(**cfg)).to(dtype)
    materialize_meta_tensors(model, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
            if p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.copy_(noise * 0.05 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    set_attention_backend(model, select_attention_backend(None, device, dtype))
    return model.eval().requires_grad_(False)


def target_shapes(cfg: dict, targets: str) -> dict[str, tuple[int, int]]:
    """diffusers module name -> (in_features, out_features) of every layer the adapter adapts."""
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = 4 * inner
    io = {"attn.to_q": (inner, inner), "attn.to_k": (inner, inner), "attn.to_v": (inner, inner),
          "attn.to_out.0": (inner, inner), "attn.add_q_proj": (inner, inner), "attn.add_k_proj": (inner, inner),
          "attn.add_v_proj": (inner, inner), "attn.to_add_out": (inner, inner), "ff.net.0.proj": (inner, mlp),
          "ff.net.2": (mlp, inner), "ff_context.net.0.proj": (inner, mlp), "ff_context.net.2": (mlp, inner),
          "proj_mlp": (inner, mlp), "proj_out": (inner + mlp, inner)}
    double = DOUBLE_ATTENTION + (DOUBLE_MLP if targets == "all" else [])
    single = SINGLE_ATTENTION + (SINGLE_REST if targets == "all" else [])
    shapes = {}
    for i in range(cfg["num_layers"]):
        shapes.update({f"transformer_blocks.{i}.{m}": io[m] for m in double})
    for i in range(cfg["num_single_layers"]):
        shapes.update({f"single_transformer_blocks.{i}.{m}": io[m] for m in single})
    return shapes


def write_adapter(path: str, shapes: dict[str, tuple[int, int]], rank: int, dtype: torch.dtype, seed: int) -> int:
    """A random adapter in diffusers' layout; returns its parameter count."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        down = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=gen) * 0.01
        tensors[f"transformer.{module}.lora_A.weight"] = down.to(dtype)
        tensors[f"transformer.{module}.lora_B.weight"] = up.to(dtype)
    save_file(tensors, path)
    return sum(t.numel() for t in tensors.values())


def lora_flop_share(shapes: dict[str, tuple[int, int]], rank: int, params: int) -> float:
    """Extra matmul FLOPs of an active adapter per token, as a share of the base linear FLOPs per token
    (2 * params; attention's own FLOPs excluded, so the share of the whole forward is smaller)."""
    return sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes.values()) / params


# -- measurement -------------------------------------------------------------------------------------


def variants(ranks: list[int]) -> dict[str, dict[str, float] | None]:
    """Name -> the selection {adapter: scale} it runs with."""
    runs = {"adapters resident, none active": None}
    runs.update({f"rank {r} active": {f"r{r}": 1.0} for r in ranks})
    if len(ranks) > 1:
        runs[" + ".join(f"rank {r}" for r in ranks) + " stacked"] = {f"r{r}": 1.0 for r in ranks}
    return runs


@contextlib.contextmanager
def without_lora(model: nn.Module):
    """The layers as they are without LoRA: no stack on the forward path at all (the base)."""
    layers = {m: m.lora for m in model.modules() if getattr(m, "lora", None) is not None}
    for layer in layers:
        layer.lora = None
    try:
        yield
    finally:
        for layer, stack in layers.items():
            layer.lora = stack


def time_variants(model, manager, inputs, args, device, label: str) -> tuple[dict, dict]:
    """({"<variant> <label>": Timing}, {variant: output}), each variant's adapters active."""
    timings, outputs = {}, {}
    run_model = lambda: model(**inputs)  # noqa: E731

    def measure(name: str) -> None:
        timings[f"{name} {label}"] = time_forward(run_model, device, args.warmup, args.iters)
        outputs[name] = run_model()
        print(f"{name} {label}: {timings[f'{name} {label}'].median_ms:.2f} ms", flush=True)

    with without_lora(model):
        measure("base (no adapter)")
    for name, selection in variants(args.ranks).items():
        manager.activate(selection)
        measure(name)
    manager.activate(None)
    return timings, outputs


def markdown_report(result: dict) -> str:
    env, shapes = result["env"], result["shapes"]
    lines = [
        f"**LoRA on the FLUX.1 transformer, config `{result['config_name']}`** on {env['device_name']}, "
        f"torch {env['torch']}, {env['dtype']}; targets `{result['targets']}`",
        "",
        f"batch {shapes['batch']}, {shapes['height']}x{shapes['width']} px = {shapes['image_tokens']} image "
        f"tokens + {shapes['text_len']} text tokens, {result['params'] / 1e9:.3g}B params; "
        f"median of {env['iters']} iters after {env['warmup']} warmup",
        "",
        "| variant | median ms | min ms | overhead vs base | first call s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in result["timings"].items():
        mode = name.split()[-1]
        base = result["timings"][f"base (no adapter) {mode}"]["median_ms"]
        lines.append(f"| {name} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | "
                     f"{(t['median_ms'] / base - 1) * 100:+.1f}% | {t['first_call_s']:.1f} |")
    lines.append("")
    for rank, info in result["adapters"].items():
        lines.append(f"rank {rank}: {info['params'] / 1e6:.1f}M adapter parameters, "
                     f"+{info['flop_share'] * 100:.2f}% linear FLOPs when active")
    checks = result["checks"]
    lines.append(f"\nresident but inactive == base: {checks['inactive_equals_base']}; every active variant "
                 f"changes the output: {checks['active_changes_output']}; all finite: {checks['finite']} -> "
                 f"{'PASS' if result['passed'] else 'FAIL'}")
    return "\n".join(lines)


def run(args) -> dict:
    from diffserve.compile import compile_repeated_blocks
    from diffserve.lora import LoRAManager

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; pass --device cpu (with --config tiny)")
    cfg = CONFIGS[args.config]
    start = time.perf_counter()
    model = build_model(cfg, device, dtype, args.seed)
    params = sum(p.numel() for p in model.parameters())
    shapes = target_shapes(cfg, args.targets)
    adapters = {}
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as folder:
        files = {}
        for i, rank in enumerate(args.ranks):
            files[f"r{rank}"] = os.path.join(folder, f"rank{rank}.safetensors")
            count = write_adapter(files[f"r{rank}"], shapes, rank, dtype, args.seed + 1 + i)
            adapters[rank] = dict(params=count, flop_share=lora_flop_share(shapes, rank, params))
        manager = LoRAManager(Pipeline(model), files, dtype)
    print(f"built the model and {len(files)} adapters in {time.perf_counter() - start:.1f}s", flush=True)

    inputs = make_inputs(cfg, args, device, dtype)
    with torch.inference_mode():
        timings, outputs = time_variants(model, manager, inputs, args, device, "eager")
        if args.compile:
            if compile_repeated_blocks(model) == 0:
                raise RuntimeError("compile_repeated_blocks compiled no block")
            compiled, _ = time_variants(model, manager, inputs, args, device, "compiled")
            timings.update(compiled)
        synchronize(device)

    base = outputs.pop("base (no adapter)")
    inactive = outputs.pop("adapters resident, none active")
    checks = dict(
        inactive_equals_base=bool(torch.equal(inactive, base)),
        active_changes_output=all(compare(out, base)["max_abs_err"] > 0 for out in outputs.values()),
        finite=all(bool(torch.isfinite(out).all()) for out in [base, *outputs.values()]),
    )
    return dict(
        config_name=args.config,
        targets=args.targets,
        params=params,
        adapters=adapters,
        env=dict(device_name=device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
                 dtype=args.dtype, warmup=args.warmup, iters=args.iters),
        shapes=dict(batch=args.batch, height=args.height, width=args.width,
                    image_tokens=(args.height // 16) * (args.width // 16), text_len=args.text_len),
        timings={name: asdict(t) for name, t in timings.items()},
        checks=checks,
        passed=all(checks.values()),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    return report_and_exit_code(result, markdown_report(result), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
