"""Step-cache speed on Wan2.1-T2V-1.3B through the whole engine on one GPU: no cache vs TeaCache vs
Cache-DiT (DBCache), per-step time and cached steps. Prepared, not yet run.

The checkpoint is written first (once): the real Wan2.1 1.3B transformer (30 blocks, width 1536,
random bf16 weights, 1-D parameters perturbed), the real Wan2.1 VAE architecture (random weights) and
a one-layer UMT5 of the real width with our test tokenizer; needs diffusers and cache-dit. Random
weights make it a SPEED run only: TeaCache's decisions on Wan depend on the timestep alone (its signal
is the timestep modulation), so its skipped steps are those the real model would skip, and its time
is meaningful; DBCache decides from the first block's residual, which random weights change too much
to be skipped (on FLUX it cached nothing), so its row shows the overhead, not a real speedup. Quality
needs the real weights (`--ckpt` a Wan2.1-T2V-1.3B-Diffusers folder; the PSNR column then compares
final latents with the uncached run).

    python benchmarks/bench_cache_wan.py --json-out benchmarks/results/wan13b_cache.json
    python benchmarks/bench_cache_wan.py --modes none "tea_cache:rel_l1_thresh=0.1" cache_dit --steps 50

Modes use bench_cache_quality's syntax: `none`, `cache_dit`, `tea_cache` (the model's defaults:
TeaCache's published 1.3B coefficients, threshold 0.05, 5 warm-up steps) or `backend:key=value,...`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cache_quality import parse_mode  # noqa: E402
from parallel_common import compare, ensure_checkpoint, report, run_mode  # noqa: E402


def build_checkpoint(path: str, seed: int = 0) -> None:
    """A Wan2.1-T2V-1.3B-shaped pipeline with random weights (see bench_wan_parallel.build_checkpoint)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffserve.testing.tokenizers import build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    with torch.device("cuda"):
        # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6,
        ).to(torch.bfloat16)
        with torch.no_grad():
            for p in transformer.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.05)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1,
    )).to(torch.bfloat16)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=AutoencoderKLWan(), scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe, transformer
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/wan13b-bench")
    parser.add_argument("--modes", nargs="+", default=["none", "tea_cache", "cache_dit"])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50, help="Wan's default; TeaCache's fits used 50")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="regional torch.compile (default: eager)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    ensure_checkpoint(args.ckpt, build_checkpoint)
    prompt = {"prompt": "a red fox running through snow, cinematic", "negative_prompt": "blurry, static"}
    params = dict(height=args.height, width=args.width, num_frames=args.frames, guidance_scale=5.0,
                  max_sequence_length=512, seed=0, output_type="pt")
    results = []
    for mode in args.modes:
        backend, config = parse_mode(mode)
        engine = {"enforce_eager": not args.compile, "vae_use_tiling": True}
        if backend is not None:
            engine.update(cache_backend=backend, cache_config=config)
        # The warm-up runs the full step count: a cache's decisions (and compiled graphs) then match.
        result = run_mode(args.ckpt, mode, engine, prompt, params, args.steps, args.steps, args.repeats,
                          warmup_output_type="latent", compare_latents=True)
        result["gpus"] = 1
        print(f"{mode}: step {result['step_ms']:.1f} ms, cached steps {result['cached_steps']}", flush=True)
        results.append(result)
    report(compare(results), f"Wan2.1-T2V-1.3B pipeline (random weights), {args.width}x{args.height}, "
           f"{args.frames} frames, CFG 5.0, {args.steps} steps, step caches", args, args.json_out)


if __name__ == "__main__":
    main()
