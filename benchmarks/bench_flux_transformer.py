#!/usr/bin/env python
"""FLUX.1 transformer: diffserve vs diffusers, same random weights, one forward pass.

Builds diffusers' FluxTransformer2DModel with random weights, loads those weights into diffserve's
FluxTransformer2DModel through its checkpoint mapping (so the mapping is tested too), checks the two
outputs agree, then times one forward of each (eager, and with --compile regionally compiled).

    # the acceptance run: real FLUX.1-dev shape, bf16, one GPU (~48 GB for both models)
    python benchmarks/bench_flux_transformer.py --config dev --compile --json-out flux_dev.json
    # smoke test on CPU in seconds
    python benchmarks/bench_flux_transformer.py --config tiny --device cpu --dtype float32 \
        --height 64 --width 64 --text-len 16 --iters 3 --warmup 1

Exits 1 if the outputs are not finite or disagree beyond the tolerance of the dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import asdict

import torch

from forward_timing import compare, device_name, report_and_exit_code, time_forward

# Keyword arguments accepted by both diffusers' model and our FluxTransformerConfig.
CONFIGS = {
    # black-forest-labs/FLUX.1-dev transformer/config.json
    "dev": dict(
        patch_size=1,
        in_channels=64,
        out_channels=None,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    # Same structure, small enough for a CPU in seconds; in_channels stays 64 so inputs keep their shape.
    "tiny": dict(
        patch_size=1,
        in_channels=64,
        out_channels=None,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    ),
}

# Relative L2 error allowed between the two implementations. In bf16 the two differ by rounding
# in different places (fused QKV, op order) and that compounds over 57 blocks.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

GUIDANCE = 3.5  # FLUX.1-dev's default guidance_scale


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="dev")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (multiple of 16)")
    p.add_argument("--text-len", type=int, default=512, help="T5 tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time both models with regional torch.compile")
    p.add_argument("--attn-backend", default=None, help="diffserve attention backend (default: sdpa)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.height % 16 or args.width % 16:
        p.error("--height and --width must be multiples of 16 (VAE /8, then 2x2 patches)")
    return args


# -- models ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # Parameters are created directly in `dtype`: 12B params never exist in fp32 (48 GB) first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_reference(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """diffusers' model with its default init (nn.Linear's kaiming-uniform, so activations keep a
    sane scale over all blocks), built on `device` in `dtype`."""
    from diffusers import FluxTransformer2DModel as DiffusersFlux

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = DiffusersFlux(**cfg)
    # RMSNorm weights start at exactly 1 (and some biases at 0): two such parameters swapped by the
    # weight mapping would go unnoticed. Perturbing the 1-D parameters (cheap: they are tiny) makes
    # every parameter distinct.
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 0.05)
    return model.eval().requires_grad_(False)


def build_ours(cfg: dict, reference, device: torch.device, dtype: torch.dtype, attn_backend: str | None):
    """diffserve's model, built on meta and filled from the reference's state dict through
    load_weights (the same path a real checkpoint takes). Returns (model, missing parameter names)."""
    from diffserve.layers.attention import select_attention_backend, set_attention_backend
    from diffserve.loader.diffusers_loader import materialize_meta_tensors
    from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig

    with torch.device("meta"):
        model = FluxTransformer2DModel(FluxTransformerConfig(**cfg)).to(dtype)
    # Not to_empty(): that would drop the weight_loader attributes load_weights relies on.
    materialize_meta_tensors(model, device)
    loaded = model.load_weights(reference.state_dict().items())
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    set_attention_backend(model, select_attention_backend(attn_backend, device, dtype))
    return model.eval().requires_grad_(False), missing


def compile_reference(model) -> None:
    if hasattr(model, "compile_repeated_blocks"):  # diffusers >= 0.35
        model.compile_repeated_blocks()
        return
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.compile()


def compile_ours(model) -> None:
    from diffserve.compile import compile_repeated_blocks

    if compile_repeated_blocks(model) == 0:
        raise RuntimeError("compile_repeated_blocks compiled no block")


# -- inputs ------------------------------------------------------------------------------------------


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """Positions (0, row, col) of the packed latent tokens, as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def make_inputs(cfg: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    # Drawn on the CPU so the same seed gives the same inputs on any device.
    gen = torch.Generator().manual_seed(args.seed)
    rows, cols = args.height // 16, args.width // 16
    batch = args.batch
    inputs = dict(
        hidden_states=torch.randn(batch, rows * cols, cfg["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(batch, args.text_len, cfg["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=gen),
        # FluxPipeline passes sigma = t / 1000 in [0, 1]; both models scale it by 1000.
        timestep=torch.rand(batch, generator=gen),
        img_ids=image_ids(rows, cols),
        txt_ids=torch.zeros(args.text_len, 3),
    )
    # Like FluxPipeline: everything in the model dtype except guidance, which it keeps in fp32.
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    inputs["guidance"] = (
        torch.full((batch,), GUIDANCE, device=device, dtype=torch.float32) if cfg["guidance_embeds"] else None
    )
    return inputs


# -- measurement -------------------------------------------------------------------------------------


def markdown_report(result: dict) -> str:
    env, shapes, timings = result["env"], result["shapes"], result["timings"]
    check = result["correctness"]
    lines = [
        f"**FLUX.1 transformer, config `{result['config_name']}`** on {env['device_name']}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}, {env['dtype']}, "
        f"attention {env['attn_backend']}",
        "",
        f"batch {shapes['batch']}, {shapes['height']}x{shapes['width']} px = {shapes['image_tokens']} image "
        f"tokens + {shapes['text_len']} text tokens, {result['params'] / 1e9:.3g}B params; "
        f"median of {env['iters']} iters after {env['warmup']} warmup",
        "",
        "| variant | median ms | min ms | diffusers / diffserve | first call s | peak mem GiB | activations GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in timings.items():
        mode = name.split()[-1]
        speedup = timings[f"diffusers {mode}"]["median_ms"] / t["median_ms"] if name.startswith("diffserve") else None
        mem = (
            f"{t['peak_mem_gib']:.1f} | {t['activation_mem_gib']:.2f}" if t["peak_mem_gib"] is not None else "- | -"
        )
        lines.append(
            f"| {name} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | "
            f"{f'{speedup:.3f}x' if speedup else '-'} | {t['first_call_s']:.1f} | {mem} |"
        )
    verdict = "PASS" if result["passed"] else "FAIL"
    lines += [
        "",
        f"diffserve vs diffusers output ({env['dtype']}): rel L2 err {check['rel_err']:.3e}, "
        f"max abs err {check['max_abs_err']:.3e} (output abs max {check['ref_abs_max']:.3g}), "
        f"tolerance {result['tolerance']:.0e} -> {verdict}",
    ]
    if "compiled_rel_err" in check:
        lines.append(f"compiled diffserve vs eager diffusers: rel L2 err {check['compiled_rel_err']:.3e}")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------


def run(args) -> dict:
    import diffusers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; pass --device cpu (with --config tiny)")
    cfg = CONFIGS[args.config]

    t0 = time.perf_counter()
    reference = build_reference(cfg, device, dtype, args.seed)
    ours, missing = build_ours(cfg, reference, device, dtype, args.attn_backend)
    print(f"built both models in {time.perf_counter() - t0:.1f}s", flush=True)
    if missing:
        print(f"WARNING: {len(missing)} diffserve parameter(s) not loaded: {missing[:10]}", flush=True)

    inputs = make_inputs(cfg, args, device, dtype)
    ref_kwargs = dict(inputs, return_dict=False)
    run_ref = lambda: reference(**ref_kwargs)[0]  # noqa: E731
    run_ours = lambda: ours(**inputs)  # noqa: E731

    with torch.inference_mode():
        ref_out, ours_out = run_ref(), run_ours()
        check = compare(ours_out, ref_out)
        print(f"rel err {check['rel_err']:.3e}, max abs err {check['max_abs_err']:.3e}", flush=True)
        if not (check["ref_finite"] and check["ours_finite"]):
            finite = f"diffusers {check['ref_finite']}, diffserve {check['ours_finite']}"
            print(f"WARNING: non-finite output (all finite: {finite})", flush=True)

        timings = {}
        for name, fn in (("diffusers eager", run_ref), ("diffserve eager", run_ours)):
            timings[name] = time_forward(fn, device, args.warmup, args.iters)
            print(f"{name}: {timings[name].median_ms:.2f} ms", flush=True)

        if args.compile:
            compile_reference(reference)
            compile_ours(ours)
            for name, fn in (("diffusers compiled", run_ref), ("diffserve compiled", run_ours)):
                timings[name] = time_forward(fn, device, args.warmup, args.iters)
                t = timings[name]
                print(f"{name}: {t.median_ms:.2f} ms (first call {t.first_call_s:.1f}s)", flush=True)
            check["compiled_rel_err"] = compare(run_ours(), ref_out)["rel_err"]

    tolerance = TOLERANCE[dtype]
    passed = not missing and check["ref_finite"] and check["ours_finite"] and check["rel_err"] <= tolerance
    return dict(
        config_name=args.config,
        config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        params=sum(p.numel() for p in ours.parameters()),
        env=dict(
            device_name=device_name(device),
            torch=torch.__version__,
            cuda=torch.version.cuda,
            diffusers=diffusers.__version__,
            dtype=args.dtype,
            attn_backend=ours.transformer_blocks[0].attn.attn.backend.name,
            warmup=args.warmup,
            iters=args.iters,
        ),
        shapes=dict(
            batch=args.batch,
            height=args.height,
            width=args.width,
            image_tokens=(args.height // 16) * (args.width // 16),
            text_len=args.text_len,
        ),
        timings={name: asdict(t) for name, t in timings.items()},
        correctness=check,
        missing_params=missing,
        tolerance=tolerance,
        passed=passed,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    return report_and_exit_code(result, markdown_report(result), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
