"""Wan2.1-T2V-14B through the whole engine on one GPU and in parallel modes (Ulysses, ring, CFG
parallel, with VAE patch parallel): per-step latency, decode time and agreement with one GPU.

The checkpoint is written first: the real Wan2.1 14B transformer (40 blocks, width 5120, random bf16
weights, 1-D parameters perturbed), the real Wan2.1 VAE architecture (random fp32 weights, so decode
time is the real one) and a one-layer UMT5 of the real width (4096) with our test tokenizer. Each
mode runs in a fresh engine (benchmarks/parallel_common.py). Unless --no-vae-patch, every mode decodes
in the VAE's tiles: one GPU alone, parallel modes with VAE patch parallel over all their GPUs (the same
tiles, so the decode times show the patch-parallel speedup). Agreement with one GPU is measured on the
final latents: the random-weight VAE saturates its output, which would hide differences.

    python benchmarks/bench_wan_parallel.py --modes 1gpu,ulysses4,cfg2xulysses2 --json-out r.json
"""

from __future__ import annotations

import argparse

import torch

from parallel_common import compare, ensure_checkpoint, report, run_mode, world_size

MODES = {
    "1gpu": {},
    "ulysses2": {"ulysses_degree": 2},
    "ulysses4": {"ulysses_degree": 4},
    "ring4": {"ring_degree": 4},
    "ulysses2xring2": {"ulysses_degree": 2, "ring_degree": 2},
    "cfg2xulysses2": {"cfg_parallel_size": 2, "ulysses_degree": 2},
    "ulysses8": {"ulysses_degree": 8},
    "cfg2xulysses4": {"cfg_parallel_size": 2, "ulysses_degree": 4},
}


def build_checkpoint(path: str, seed: int = 0) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffserve.testing.tokenizers import build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 14B parameters: never allocate them in fp32
    try:
        with torch.device("cuda"):
            # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json
            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6,
            )
            with torch.no_grad():
                for p in transformer.parameters():
                    if p.dim() == 1:
                        p.add_(torch.randn_like(p) * 0.05)
    finally:
        torch.set_default_dtype(default_dtype)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1,
    )).to(torch.bfloat16)
    vae = AutoencoderKLWan()  # the Wan2.1 VAE's architecture (base_dim 96, z_dim 16)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True, max_shard_size="10GB")
    del pipe, transformer
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/wan14b-bench")
    parser.add_argument("--modes", default="1gpu,ulysses4,cfg2xulysses2")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="regional torch.compile (default: eager)")
    parser.add_argument("--no-vae-patch", action="store_true", help="decode untiled on every rank")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    ensure_checkpoint(args.ckpt, build_checkpoint)

    prompt = {"prompt": "a red fox running through snow, cinematic", "negative_prompt": "blurry, static"}
    params = dict(height=args.height, width=args.width, num_frames=args.frames, guidance_scale=5.0,
                  max_sequence_length=512, seed=0, output_type="pt")
    results = []
    for mode in args.modes.split(","):
        gpus = world_size(MODES[mode])
        engine = {**MODES[mode], "enforce_eager": not args.compile}
        if not args.no_vae_patch:  # one GPU decodes the same tiles alone, so outputs stay comparable
            engine.update(vae_patch_parallel_size=gpus) if gpus > 1 else engine.update(vae_use_tiling=True)
        result = run_mode(args.ckpt, mode, engine, prompt, params, args.steps, 1, args.repeats,
                          warmup_output_type="latent", compare_latents=True)
        result["gpus"] = gpus
        print(f"{mode}: load {result['load_s']:.1f} s, step {result['step_ms']:.1f} ms, "
              f"decode {result['decode_s']:.2f} s", flush=True)
        results.append(result)
    report(compare(results), f"Wan2.1-T2V-14B pipeline, {args.width}x{args.height}, {args.frames} frames, CFG 5.0, "
           f"{args.steps} steps, {'regional torch.compile' if args.compile else 'eager'}", args, args.json_out)


if __name__ == "__main__":
    main()
