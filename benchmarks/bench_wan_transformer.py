#!/usr/bin/env python
"""Wan2.1 transformer: diffserve vs diffusers, same random weights, one forward pass.

Builds diffusers' WanTransformer3DModel with random weights, loads those weights into diffserve's
WanTransformer3DModel through its checkpoint mapping (so the q/k/v fusion is tested too), checks the
two outputs agree, then times one forward of each (eager, and with --compile regionally compiled).
The input is one text-to-video denoising step: latents of a 480x832, 81-frame video (21 x 60 x 104
latents = 32760 tokens) and 512 UMT5 tokens, batch 1, classifier-free guidance off.

    # the acceptance runs: real shapes, bf16, one GPU (1.3B: ~6 GB for both models; 14B: ~60 GB)
    python benchmarks/bench_wan_transformer.py --config 1.3b --json-out wan_1.3b.json
    python benchmarks/bench_wan_transformer.py --config 14b --json-out wan_14b.json
    # smoke test on CPU in seconds (tiny model, 64x64, 5 frames, 16 text tokens, fp32)
    python benchmarks/bench_wan_transformer.py --config tiny --device cpu

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

# Keyword arguments accepted by both diffusers' model and our WanTransformerConfig.
_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
CONFIGS = {
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    "1.3b": dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (Wan2.2 A14B's experts have this shape too)
    "14b": dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    # Same structure, small enough for a CPU in seconds; in/out channels stay 16 so inputs keep their shape.
    "tiny": dict(_COMMON, attention_head_dim=32, num_attention_heads=4, ffn_dim=256, num_layers=2, text_dim=64),
}
# Per config: (height, width, frames, text tokens) unless given on the command line.
DEFAULT_SHAPES = {"1.3b": (480, 832, 81, 512), "14b": (480, 832, 81, 512), "tiny": (64, 64, 5, 16)}

# Relative L2 error allowed between the two implementations. In bf16 they differ by rounding in
# different places (fused QKV, op order), compounding over 30-40 blocks.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

TIMESTEP = 757.0  # mid-schedule; any value in [0, 1000] exercises the same kernels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="1.3b")
    p.add_argument("--height", type=int, default=None, help="video height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels (multiple of 16)")
    p.add_argument("--frames", type=int, default=None, help="video frames (4k+1)")
    p.add_argument("--text-len", type=int, default=None, help="UMT5 tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time both models with regional torch.compile")
    p.add_argument("--attn-backend", default=None, help="diffserve attention backend (default: sdpa)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, metavar="PATH")
    args = p.parse_args(argv)
    height, width, frames, text_len = DEFAULT_SHAPES[args.config]
    args.height = args.height or height
    args.width = args.width or width
    args.frames = args.frames or frames
    args.text_len = args.text_len or text_len
    if args.dtype == "auto":
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.height % 16 or args.width % 16:
        p.error("--height and --width must be multiples of 16 (VAE /8, then 2x2 patches)")
    if (args.frames - 1) % 4:
        p.error("--frames must be 4k+1 (the VAE keeps the first frame and compresses 4 frames into 1 after it)")
    return args


# -- models ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # Parameters are created directly in `dtype`: 14B params never exist in fp32 (57 GB) first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_reference(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """diffusers' model with its default init (nn.Linear's kaiming-uniform, so activations keep a
    sane scale over all blocks), built on `device` in `dtype`."""
    from diffusers import WanTransformer3DModel as DiffusersWan

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = DiffusersWan(**cfg)
    # Norm weights start at exactly 1 and biases at 0: two such parameters swapped by the weight
    # mapping would go unnoticed. Perturbing the 1-D parameters (cheap: they are tiny) makes every
    # parameter distinct.
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
    from diffserve.models.wan.wan_transformer import WanTransformer3DModel, WanTransformerConfig

    with torch.device("meta"):
        model = WanTransformer3DModel(WanTransformerConfig(**cfg)).to(dtype)
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
    for block in model.blocks:
        block.compile()


def compile_ours(model) -> None:
    from diffserve.compile import compile_repeated_blocks

    if compile_repeated_blocks(model) == 0:
        raise RuntimeError("compile_repeated_blocks compiled no block")


# -- inputs ------------------------------------------------------------------------------------------


def latent_grid(args) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of the video: VAE /4 in time (after the first
    frame) and /8 in space."""
    return (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8


def token_count(cfg: dict, args) -> int:
    frames, height, width = latent_grid(args)
    p_t, p_h, p_w = cfg["patch_size"]
    return (frames // p_t) * (height // p_h) * (width // p_w)


def make_inputs(cfg: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    # Drawn on the CPU so the same seed gives the same inputs on any device.
    gen = torch.Generator().manual_seed(args.seed)
    frames, height, width = latent_grid(args)
    inputs = dict(
        hidden_states=torch.randn(args.batch, cfg["in_channels"], frames, height, width, generator=gen),
        encoder_hidden_states=torch.randn(args.batch, args.text_len, cfg["text_dim"], generator=gen),
    )
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    # WanPipeline passes the scheduler's timestep (0..1000) expanded over the batch.
    inputs["timestep"] = torch.full((args.batch,), TIMESTEP, device=device)
    return inputs


def forward_flops(cfg: dict, args) -> float:
    """Matmul + attention FLOPs of one forward (multiply-add = 2), the usual accounting."""
    s, l = token_count(cfg, args), args.text_len
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_block = (
        2 * s * d * 3 * d + 4 * s * s * d + 2 * s * d * d  # self-attention: qkv, scores + values, out
        + 2 * s * d * d + 2 * l * d * 2 * d + 4 * s * l * d + 2 * s * d * d  # cross-attention
        + 2 * 2 * s * d * cfg["ffn_dim"]  # MLP
    )
    return args.batch * cfg["num_layers"] * per_block


# -- measurement -------------------------------------------------------------------------------------


def markdown_report(result: dict) -> str:
    env, shapes, timings = result["env"], result["shapes"], result["timings"]
    check = result["correctness"]
    lines = [
        f"**Wan2.1 transformer, config `{result['config_name']}`** on {env['device_name']}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}, {env['dtype']}, attention {env['attn_backend']}",
        "",
        f"batch {shapes['batch']}, {shapes['height']}x{shapes['width']} px x {shapes['frames']} frames = "
        f"{shapes['video_tokens']} video tokens + {shapes['text_len']} text tokens, "
        f"{result['params'] / 1e9:.3g}B params, {result['tflop']:.4g} TFLOP per forward; "
        f"median of {env['iters']} iters after {env['warmup']} warmup",
        "",
        "| variant | median ms | min ms | diffusers / diffserve | TFLOP/s | first call s | peak mem GiB "
        "| activations GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in timings.items():
        mode = name.split()[-1]
        speedup = timings[f"diffusers {mode}"]["median_ms"] / t["median_ms"] if name.startswith("diffserve") else None
        mem = (
            f"{t['peak_mem_gib']:.1f} | {t['activation_mem_gib']:.2f}" if t["peak_mem_gib"] is not None else "- | -"
        )
        tflops = result["tflop"] / (t["median_ms"] / 1e3)
        lines.append(
            f"| {name} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | {f'{speedup:.3f}x' if speedup else '-'} | "
            f"{tflops:.4g} | {t['first_call_s']:.1f} | {mem} |"
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
        del ours_out

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
        tflop=forward_flops(cfg, args) / 1e12,
        env=dict(
            device_name=device_name(device),
            torch=torch.__version__,
            cuda=torch.version.cuda,
            diffusers=diffusers.__version__,
            dtype=args.dtype,
            attn_backend=ours.blocks[0].attn1.attn.backend.name,
            warmup=args.warmup,
            iters=args.iters,
        ),
        shapes=dict(
            batch=args.batch,
            height=args.height,
            width=args.width,
            frames=args.frames,
            video_tokens=token_count(cfg, args),
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
