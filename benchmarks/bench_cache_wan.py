"""Step-cache speed on Wan2.1-T2V-1.3B through the whole engine on one GPU: no cache vs TeaCache vs
Cache-DiT (DBCache), per-step time, cached steps, and the final latents' distance to the uncached run.

The checkpoint is written first (once, to --ckpt): the real Wan2.1 1.3B transformer (30 blocks, width
1536, random bf16 weights, 1-D parameters perturbed), the real Wan2.1 VAE architecture (random
weights) and a one-layer UMT5 of the real width with our test tokenizer. Random weights make it a
SPEED run only: what it measures is the time per step at the number of steps each cache skipped.
Which steps those are is not the real model's: TeaCache's signal on Wan is the timestep modulation,
which depends on the timestep and on the (here random) time-embedding weights; DBCache decides from
the first block's residual, which random weights change too much to be skipped (on FLUX it cached
nothing), so its row shows its overhead rather than a speedup. Quality needs the real weights
(`--ckpt` a Wan2.1-T2V-1.3B-Diffusers folder; the PSNR column compares final latents).

One H200, estimated at 2-3 minutes with the checkpoint (not yet run): 480x832, 33 frames (9 latent
frames, 14k video tokens), CFG 5, 50 steps (the step count TeaCache's coefficients were fitted at),
eager; each mode in a fresh engine, a 2-step warm-up, then `--repeats` timed requests returning
latents (no VAE decode).
Needs diffusers (our Wan pipeline uses its VAE and scheduler) and cache-dit, carried as wheels:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/bench_cache_wan.py --json-out wan13b_cache.json
    ... --frames 81 --repeats 1     # the full-length video: estimated 1 minute per uncached request

Modes use bench_cache_quality's syntax: `none`, `cache_dit`, `tea_cache` (the model's defaults:
TeaCache's published 1.3B coefficients, threshold 0.05, 5 warm-up steps) or `backend:key=value,...`.
CPU smoke test (a tiny random Wan2.1, seconds): `--config tiny`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

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
    parser.add_argument("--config", choices=["1.3b", "tiny"], default="1.3b",
                        help="1.3b: the real Wan2.1-T2V-1.3B shapes (GPU); tiny: a tiny random Wan2.1 (CPU smoke test)")
    parser.add_argument("--ckpt", default=None, help="checkpoint folder (default: /tmp/wan13b-bench, or a temp dir)")
    parser.add_argument("--modes", nargs="+", default=["none", "tea_cache", "cache_dit"])
    parser.add_argument("--height", type=int, default=None, help="default: 480 (1.3b), 32 (tiny)")
    parser.add_argument("--width", type=int, default=None, help="default: 832 (1.3b), 32 (tiny)")
    parser.add_argument("--frames", type=int, default=None, help="default: 33 (1.3b), 5 (tiny)")
    parser.add_argument("--steps", type=int, default=50, help="Wan's default; TeaCache's fits used 50")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="regional torch.compile (default: eager)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    tiny = args.config == "tiny"
    args.height = args.height or (32 if tiny else 480)
    args.width = args.width or (32 if tiny else 832)
    args.frames = args.frames or (5 if tiny else 33)
    for mode in args.modes:
        parse_mode(mode)  # fail on a typo before the checkpoint is written

    if tiny:
        from diffserve.testing import make_tiny_checkpoint

        args.ckpt = make_tiny_checkpoint("wan2.1-t2v", args.ckpt or tempfile.mkdtemp(prefix="tiny-wan-"))
        prompt = "a fox"
    else:
        args.ckpt = args.ckpt or "/tmp/wan13b-bench"
        ensure_checkpoint(args.ckpt, build_checkpoint)
        prompt = {"prompt": "a red fox running through snow, cinematic", "negative_prompt": "blurry, static"}
    # Latents out: the timed requests skip the VAE decode, and their latents are what is compared.
    params = dict(height=args.height, width=args.width, num_frames=args.frames, guidance_scale=5.0,
                  max_sequence_length=8 if tiny else 512, seed=0, output_type="latent")
    results = []
    for mode in args.modes:
        backend, config = parse_mode(mode)
        engine = {"enforce_eager": not args.compile}
        if tiny:
            engine["device"] = "cpu"
        if backend is not None:
            engine.update(cache_backend=backend, cache_config=config)
        # Compiled, the warm-up runs every step: a skipped step takes other paths through the graph.
        warmup_steps = args.steps if args.compile else 2
        result = run_mode(args.ckpt, mode, engine, prompt, params, args.steps, warmup_steps, args.repeats,
                          warmup_output_type="latent")
        result["gpus"] = 1
        print(f"{mode}: step {result['step_ms']:.1f} ms, cached steps {result['cached_steps']}", flush=True)
        results.append(result)
    report(compare(results), f"Wan2.1-T2V-{'tiny' if tiny else '1.3B'} pipeline (random weights), "
           f"{args.width}x{args.height}, {args.frames} frames, CFG 5.0, {args.steps} steps, step caches, "
           f"{'regional torch.compile' if args.compile else 'eager'}", args, args.json_out)


if __name__ == "__main__":
    main()
