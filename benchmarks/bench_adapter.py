"""The diffusers adapter's overhead: a request through diffserve's engine (admission, scheduler,
worker, the adapter's call) vs the same diffusers pipeline object called directly, in the same run.

The checkpoint is PixArt-Sigma-XL-2-1024-MS's configuration with random bf16 weights: the real
transformer (28 blocks, 1152 wide, 0.6B parameters), the real SDXL-style VAE, and a T5 encoder of the
real width (4096) but 2 layers (`--full-text-encoder`: all 24 layers of T5-XXL, 4.7B parameters, +9 GB).
diffserve has no native PixArt pipeline, so `Omni` serves it through the adapter; the direct calls use
the very pipeline object the adapter wraps (`worker.pipeline.diffusers_pipeline`), so weights, kernels
and allocator are shared and only the path differs. Both paths get the same prompt, size, steps and
seed (one CPU generator), run alternately after a warm-up each, and are timed from the call to the
output on the host (CUDA synchronised). The outputs must agree (max-abs on the [0, 1] pixels).

GPU (one card, bf16; the checkpoint is written on first use):

    python benchmarks/bench_adapter.py --ckpt /tmp/pixart-sigma-bench --size 1024 --steps 20 --repeats 5 \
        --json-out benchmarks/results/adapter.json

CPU smoke test (the tiny random PixArt-Sigma, seconds):

    python benchmarks/bench_adapter.py --config tiny --device cpu --dtype float32 --size 32 --steps 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

PROMPT = "a lighthouse on a cliff at sunset, dramatic clouds, detailed"
NEGATIVE = "blurry, low quality"


def build_checkpoint(path: str, full_text_encoder: bool, seed: int = 0) -> None:
    """PixArt-Sigma-XL-2-1024-MS's component configurations with random bf16 weights."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from diffserve.testing.tokenizers import build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(max_length=300)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never allocate billions of parameters in fp32
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            transformer = PixArtTransformer2DModel(
                num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
                interpolation_scale=2, use_additional_conditions=False,
            )
            text_encoder = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24 if full_text_encoder else 2,
                num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                pad_token_id=0, eos_token_id=1,
            ))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
            )
    finally:
        torch.set_default_dtype(default_dtype)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(path, safe_serialization=True)


def ensure_checkpoint(args) -> str:
    if args.config == "tiny":
        from diffserve.testing import make_tiny_checkpoint

        return make_tiny_checkpoint("pixart-sigma", args.ckpt or tempfile.mkdtemp(prefix="tiny-pixart-"))
    if not os.path.exists(os.path.join(args.ckpt, "model_index.json")):
        start = time.perf_counter()
        build_checkpoint(args.ckpt, args.full_text_encoder)
        print(f"wrote checkpoint to {args.ckpt} in {time.perf_counter() - start:.1f} s", flush=True)
    return args.ckpt


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def through_engine(omni, args, steps: int, seed: int) -> tuple[float, torch.Tensor]:
    from diffserve import OmniDiffusionSamplingParams

    params = OmniDiffusionSamplingParams(height=args.size, width=args.size, num_inference_steps=steps,
                                         guidance_scale=args.guidance_scale, seed=seed, output_type="pt")
    start = time.perf_counter()
    out = omni.generate({"prompt": PROMPT, "negative_prompt": NEGATIVE}, params)[0]
    sync(args.device)
    return time.perf_counter() - start, out.images


def direct(pipe, args, steps: int, seed: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.inference_mode():
        images = pipe(PROMPT, negative_prompt=NEGATIVE, height=args.size, width=args.size, num_inference_steps=steps,
                      guidance_scale=args.guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="pt").images
    images = images.float().cpu()
    sync(args.device)
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["real", "tiny"], default="real")
    parser.add_argument("--ckpt", default="/tmp/pixart-sigma-bench")
    parser.add_argument("--full-text-encoder", action="store_true", help="all 24 T5-XXL layers (default 2)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    from diffserve import Omni, OmniDiffusionSamplingParams

    path = ensure_checkpoint(args)
    start = time.perf_counter()
    with Omni(path, dtype=args.dtype, device=args.device, disable_progress_bar=True) as omni:
        load_s = time.perf_counter() - start
        assert omni.od_config.resolved_backend == "diffusers", "PixArt-Sigma should be served by the adapter"
        pipe = omni.engine.executor.worker.pipeline.diffusers_pipeline
        # Warm-up (allocator, kernels, cuDNN autotuning), both paths.
        through_engine(omni, args, 2, seed=1000)
        direct(pipe, args, 2, seed=1000)
        engine_s, direct_s, max_abs = [], [], 0.0
        for i in range(args.repeats):
            seconds, ours = through_engine(omni, args, args.steps, seed=i)
            engine_s.append(seconds)
            seconds, theirs = direct(pipe, args, args.steps, seed=i)
            direct_s.append(seconds)
            max_abs = max(max_abs, (ours - theirs).abs().max().item())
        params = OmniDiffusionSamplingParams(height=args.size, width=args.size, num_inference_steps=args.steps,
                                             output_type="pt")
        metrics = omni.generate({"prompt": PROMPT, "seed": 0}, params)[0].metrics
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "config": args.config, "full_text_encoder": args.full_text_encoder, "dtype": args.dtype,
        "size": args.size, "steps": args.steps, "cfg": args.guidance_scale > 1, "repeats": args.repeats,
        "load_s": load_s,
        "engine_request_s": statistics.median(engine_s), "engine_request_s_all": engine_s,
        "diffusers_direct_s": statistics.median(direct_s), "diffusers_direct_s_all": direct_s,
        "overhead_ratio": statistics.median(engine_s) / statistics.median(direct_s),
        "max_abs_diff": max_abs,
        "engine_stage_metrics": {k: v for k, v in metrics.items() if k.endswith("_s")},
    }
    print(f"{result['device']}: {args.size}x{args.size}, {args.steps} steps, CFG, {args.dtype}")
    print(f"  through the engine (adapter): {result['engine_request_s']:.3f} s (median of {args.repeats})")
    print(f"  diffusers called directly:    {result['diffusers_direct_s']:.3f} s")
    print(f"  ratio {result['overhead_ratio']:.3f}, outputs max-abs {max_abs:.2e}")
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
