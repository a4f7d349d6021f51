#!/usr/bin/env python
"""One transformer forward, ours vs diffusers, same random weights, real configs, for each family:
FLUX.1-dev, SD3.5-large, Qwen-Image, Stable Audio Open (and Wan through bench_wan_transformer.py).

For each model: build diffusers' model on the GPU (its own init, 1-D parameters perturbed), fill ours
from its state dict through our load_weights, check the outputs agree, then time the variants in one
run: diffusers eager / regionally compiled, ours eager / compiled / compiled with FP8 linears / with
FP8 linears and FP8 attention (cudnn_fp8; needs nvidia-cudnn-frontend), optionally replaying CUDA
graphs (--cuda-graphs). With
--recompile, also the first call at batch 4 after batch 1 (a server's first busy minute), ours
compiled with static shapes vs with the batch dimension marked dynamic.

    python benchmarks/bench_forward.py --models flux,sd3.5-large,qwen-image,stable-audio \
        --variants all --recompile --json-out forward.json
    python benchmarks/bench_forward.py --models flux --resolution 512 --cuda-graphs \
        --variants ours-compile,ours-fp8-fp8attn-compile
    python benchmarks/bench_forward.py --models flux --tiny --device cpu --dtype float32 --variants ours-eager
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from bench_flux_transformer import default_dtype, image_ids
from forward_timing import compare, device_name, time_forward

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
RESOLUTION = 1024  # FLUX and Qwen-Image image side in pixels (--resolution)


def _flux(tiny: bool):
    from diffusers import FluxTransformer2DModel

    from diffserve.models.flux.flux_transformer import FluxTransformer2DModel as Ours, FluxTransformerConfig

    cfg = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
               joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    if tiny:
        cfg.update(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                   joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))

    def inputs(batch, gen, device, dtype):
        rows = cols = 8 if tiny else RESOLUTION // 16  # 1024x1024 by default
        text = 16 if tiny else 512
        x = dict(hidden_states=torch.randn(batch, rows * cols, 64, generator=gen),
                 encoder_hidden_states=torch.randn(batch, text, cfg["joint_attention_dim"], generator=gen),
                 pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=gen),
                 timestep=torch.rand(batch, generator=gen), img_ids=image_ids(rows, cols), txt_ids=torch.zeros(text, 3))
        x = {k: v.to(device, dtype) for k, v in x.items()}
        x["guidance"] = torch.full((batch,), 3.5, device=device)
        return x, x

    return FluxTransformer2DModel, cfg, lambda: Ours(FluxTransformerConfig(**cfg)), inputs


def _sd35(tiny: bool):
    from diffusers import SD3Transformer2DModel

    from diffserve.models.sd3.sd3_transformer import SD3Transformer2DModel as Ours, SD3TransformerConfig

    cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
               num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
    if tiny:
        cfg.update(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                   caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=32)

    def inputs(batch, gen, device, dtype):
        side, text = (16, 16) if tiny else (128, 333)  # 1024x1024 latents, 77 CLIP + 256 T5 tokens
        x = dict(hidden_states=torch.randn(batch, 16, side, side, generator=gen),
                 encoder_hidden_states=torch.randn(batch, text, cfg["joint_attention_dim"], generator=gen),
                 pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=gen),
                 timestep=torch.rand(batch, generator=gen) * 1000)
        x = {k: v.to(device, dtype) for k, v in x.items()}
        return x, x

    return SD3Transformer2DModel, cfg, lambda: Ours(SD3TransformerConfig(**cfg)), inputs


def _stable_audio(tiny: bool):
    from diffusers import StableAudioDiTModel

    from diffserve.models.stable_audio.stable_audio_transformer import (
        StableAudioDiTModel as Ours,
        StableAudioDiTConfig,
    )

    cfg = dict(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64, num_attention_heads=24,
               num_key_value_attention_heads=12, out_channels=64, cross_attention_dim=768, time_proj_dim=256,
               global_states_input_dim=1536, cross_attention_input_dim=768)
    if tiny:
        cfg.update(sample_size=16, num_layers=2, num_attention_heads=4, num_key_value_attention_heads=2,
                   attention_head_dim=16, cross_attention_dim=64, cross_attention_input_dim=64,
                   global_states_input_dim=128, time_proj_dim=32)

    def inputs(batch, gen, device, dtype):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        x = dict(hidden_states=torch.randn(batch, cfg["in_channels"], cfg["sample_size"], generator=gen),
                 timestep=torch.rand(1, generator=gen),
                 encoder_hidden_states=torch.randn(batch, 130, cfg["cross_attention_input_dim"], generator=gen),
                 global_hidden_states=torch.randn(batch, 1, cfg["global_states_input_dim"], generator=gen))
        x = {k: v.to(device, dtype) for k, v in x.items()}
        # diffusers takes the rotary table from its pipeline (half the head dim, frames + the global
        # token); ours builds the same table itself.
        rotary = get_1d_rotary_pos_embed(cfg["attention_head_dim"] // 2, cfg["sample_size"] + 1, use_real=True,
                                         repeat_interleave_real=False)
        return {**x, "rotary_embedding": tuple(t.to(device) for t in rotary)}, x

    return StableAudioDiTModel, cfg, lambda: Ours(StableAudioDiTConfig(**cfg)), inputs


def _qwen_image(tiny: bool):
    from diffusers import QwenImageTransformer2DModel

    from diffserve.models.qwen_image.qwen_image_transformer import (
        QwenImageTransformer2DModel as Ours,
        QwenImageTransformerConfig,
    )

    cfg = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
    if tiny:
        cfg.update(num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                   axes_dims_rope=(8, 12, 12))

    def inputs(batch, gen, device, dtype):
        rows = cols = 8 if tiny else RESOLUTION // 16  # 1024x1024 by default
        text = 16 if tiny else 256
        x = dict(hidden_states=torch.randn(batch, rows * cols, 64, generator=gen).to(device, dtype),
                 encoder_hidden_states=torch.randn(batch, text, cfg["joint_attention_dim"], generator=gen).to(device, dtype),
                 encoder_hidden_states_mask=torch.ones(batch, text, device=device, dtype=torch.long),
                 timestep=torch.rand(batch, generator=gen).to(device, dtype),
                 img_shapes=[[(1, rows, cols)]] * batch)
        return x, dict(x)

    return QwenImageTransformer2DModel, cfg, lambda: Ours(QwenImageTransformerConfig(**cfg)), inputs


MODELS = {"flux": _flux, "sd3.5-large": _sd35, "stable-audio": _stable_audio, "qwen-image": _qwen_image}
VARIANTS = ("diffusers-eager", "diffusers-compile", "ours-eager", "ours-compile", "ours-fp8-compile",
            "ours-fp8-fp8attn-compile")


def build(name: str, tiny: bool, device, dtype, seed: int):
    reference_cls, cfg, make_ours, inputs = MODELS[name](tiny)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        reference = reference_cls(**cfg)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() == 1:  # distinct norms and biases: a swapped pair in the mapping would show
                p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 0.05)
    reference = reference.eval().requires_grad_(False)
    from diffserve.layers.attention import select_attention_backend, set_attention_backend
    from diffserve.loader.diffusers_loader import materialize_meta_tensors

    with torch.device("meta"):
        ours = make_ours().to(dtype)
    materialize_meta_tensors(ours, device)
    loaded = ours.load_weights(reference.state_dict().items())
    missing = sorted({n for n, _ in ours.named_parameters()} - loaded)
    if missing:
        raise RuntimeError(f"{name}: parameters not loaded: {missing[:5]}")
    set_attention_backend(ours, select_attention_backend(None, device, dtype))
    return reference, ours.eval().requires_grad_(False), inputs


def compile_reference_blocks(reference: torch.nn.Module) -> None:
    """diffusers' regional compile. Classes that do not declare `_repeated_blocks` (SD3 and Stable
    Audio in diffusers 0.42 refuse `compile_repeated_blocks`) get the same by hand: each block of the
    model's block lists compiled on its own, as ours are."""
    if getattr(reference, "_repeated_blocks", None):
        reference.compile_repeated_blocks()
        return
    for child in reference.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                block.compile()


def output(result):
    return result[0] if isinstance(result, (tuple, list)) else getattr(result, "sample", result)


def run_model(name: str, args, device, dtype) -> dict:
    from diffserve.compile import compile_repeated_blocks
    from diffserve.cuda_graphs import CudaGraphedForward
    from diffserve.layers.attention import set_attention_backend
    from diffserve.layers.attention.backends.cudnn_fp8 import CudnnFp8AttentionBackend
    from diffserve.layers.quantization import quantize_linear_layers

    reference, ours, make_inputs = build(name, args.tiny, device, dtype, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ref_in, our_in = make_inputs(1, gen, device, dtype)
    row = {"model": name, "params_b": sum(p.numel() for p in ours.parameters()) / 1e9, "timings": {}}
    with torch.no_grad():
        expected = output(reference(**ref_in, return_dict=False))
        actual = ours(**our_in)
        row["agreement"] = compare(actual, expected)
        variants = VARIANTS if args.variants == "all" else args.variants.split(",")
        for variant in variants:
            if variant.startswith("diffusers"):
                model, x = reference, ref_in
                if variant.endswith("compile"):
                    compile_reference_blocks(reference)
                fn = lambda: reference(**x, return_dict=False)  # noqa: E731
            else:
                model, x = ours, our_in
                if "fp8" in variant and "fp8_layers" not in row:
                    row["fp8_layers"] = quantize_linear_layers(ours, "fp8")
                    row["fp8_agreement"] = compare(ours(**x), expected)
                if "fp8attn" in variant:
                    set_attention_backend(ours, CudnnFp8AttentionBackend)
                    row["fp8_fp8attn_agreement"] = compare(ours(**x), expected)
                if variant.endswith("compile") and not getattr(ours, "_diffserve_compiled", False):
                    compile_repeated_blocks(ours)
                    ours._diffserve_compiled = True
                call = CudaGraphedForward(ours) if args.cuda_graphs else ours
                fn = lambda: call(**x)  # noqa: E731
            timing = time_forward(fn, device, args.warmup, args.iters)
            row["timings"][variant] = {"median_ms": timing.median_ms, "first_call_s": timing.first_call_s,
                                       "peak_mem_gib": timing.peak_mem_gib}
            print(f"{name:>13} {variant:<18} {timing.median_ms:9.2f} ms (first call {timing.first_call_s:.1f} s)",
                  flush=True)
            del model
    t = row["timings"]
    for ours_v, ref_v in (("ours-compile", "diffusers-compile"), ("ours-eager", "diffusers-eager"),
                          ("ours-fp8-compile", "ours-compile"), ("ours-fp8-fp8attn-compile", "ours-compile")):
        if ours_v in t and ref_v in t:
            row[f"speedup_{ours_v}_vs_{ref_v}"] = t[ref_v]["median_ms"] / t[ours_v]["median_ms"]
    del reference, ours
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return row


RECOMPILE_SETUPS = {
    # name: (batch dim marked dynamic at compile, batch sizes called before the first batch-4 call)
    "static": (False, (1,)),
    "dynamic": (True, (1,)),
    # What `serve --warmup 1024x1024:1,1024x1024:2` does: torch specializes size 1, so batch 1 gets
    # its own graph and batch 2 compiles one with a dynamic batch that every larger batch reuses.
    "warmed_batch1_and_2": (False, (1, 2)),
}


def recompile_check(args, device, dtype) -> dict:
    """Ours compiled, FLUX: the first batch-4 call after smaller batches, per RECOMPILE_SETUPS."""
    from diffserve.compile import compile_repeated_blocks

    rows = {}
    for name, (dynamic, warm_batches) in RECOMPILE_SETUPS.items():
        torch._dynamo.reset()
        reference, ours, make_inputs = build("flux", args.tiny, device, dtype, args.seed)
        del reference
        compile_repeated_blocks(ours, dynamic=dynamic or None)
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for batch in warm_batches:
                _, x = make_inputs(batch, gen, device, dtype)
                for _ in range(2):
                    ours(**x)
            _, four = make_inputs(4, gen, device, dtype)
            steady_4 = time_forward(lambda: ours(**four), device, 2, 3)  # noqa: B023
            rows[name] = {"first_batch4_s": steady_4.first_call_s, "steady_batch4_ms": steady_4.median_ms}
            print(f"recompile {name}: first batch-4 call {steady_4.first_call_s:.2f} s, "
                  f"steady {steady_4.median_ms:.1f} ms", flush=True)
        del ours
        gc.collect()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux,sd3.5-large,qwen-image,stable-audio")
    p.add_argument("--variants", default="all", help=f"'all' or a comma list of {', '.join(VARIANTS)}")
    p.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke test)")
    p.add_argument("--recompile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true", help="our variants replay CUDA graphs (diffserve.cuda_graphs)")
    p.add_argument("--resolution", type=int, default=1024, help="FLUX / Qwen-Image image side in pixels")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    global RESOLUTION
    RESOLUTION = args.resolution
    result = {"device": device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "models": []}
    ok = True
    for name in args.models.split(","):
        row = run_model(name, args, device, dtype)
        row["within_tolerance"] = row["agreement"]["rel_err"] <= TOLERANCE[dtype]
        ok &= row["within_tolerance"]
        result["models"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.recompile:
        result["recompile"] = recompile_check(args, device, dtype)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
