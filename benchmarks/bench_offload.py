"""CPU offload on one GPU: peak GPU memory and time of no offload, model-level and layerwise offload,
for FLUX.1-dev 1024x1024 and Wan2.1-T2V-14B 480p (real architectures, random bf16 weights), and
whether the outputs are identical to no offload.

Checkpoints are written first, every component at its real size so the copies are the real ones:
the FLUX.1-dev transformer (11.9B) with CLIP-L, a T5-XXL encoder and the FLUX VAE; the Wan2.1 14B
transformer with a UMT5-XXL encoder and the Wan2.1 VAE. (The text encoders use the small test
vocabulary, so their embedding tables are smaller than the real ones; the 24 encoder layers are full
size.) 1-D parameters are perturbed so no norm or bias is trivially 1 or 0. Each model's checkpoint is
deleted after its runs unless --keep (both together need more disk than one H200 machine has).

Per model and mode, in a fresh engine (regional torch.compile unless --eager): a warm-up request
(compile, allocator; it also decodes, so the encoders are prefetched as in steady serving), then timed
requests. Reported: per-step time (denoise stage / steps, median), end-to-end time of a request, the
request's and the denoise stage's peak GPU memory (torch.cuda.max_memory_allocated: tensors, not the
allocator's reserve), the denoisers' weight bytes, and the final latents of a short extra request
compared bit for bit with no offload. Printed against the targets:
- layerwise: denoise-stage peak <= 30% of the transformer's weight bytes, at <= 1.3x the step time;
- model-level: <= 1.05x the end-to-end time.
A bound to read the step times with: layerwise offload copies every block once per transformer call,
so a step takes at least the transformer's bytes over the host-to-device bandwidth.

The engine itself imports diffusers (VAEs, schedulers) and Wan's prompt cleaning needs ftfy: on the
lent GPU machines carry those wheels as benchmarks/README.md shows, then:

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_offload.py --models flux --json-out OUT.json
    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_offload.py --models wan --wan-steps 10 --json-out OUT.json

On a CPU, `--tiny --device cpu` runs the same measurement on the tiny test checkpoints in seconds (a
smoke test of the script; it measures nothing about offload).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

GIB = 1024**3
MODES = {
    "none": {},
    "model": {"enable_cpu_offload": True},
    "layerwise": {"enable_layerwise_offload": True},
}
TARGETS = {"layerwise_peak_share": 0.30, "layerwise_step_ratio": 1.3, "model_e2e_ratio": 1.05}


# -- checkpoints -------------------------------------------------------------------------------------


def _random_bf16(build):
    """Build a module on the GPU in bf16 (never fp32: billions of parameters), 1-D parameters perturbed."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            module = build()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return module


def _t5_xxl_encoder(vocab_size: int, umt5: bool = False):
    """The T5-XXL / UMT5-XXL encoder stack (24 layers, d_model 4096, gated-GELU FFN 10240)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=vocab_size, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0,
                        eos_token_id=1)
    return _random_bf16(lambda: model_cls(config))


def build_flux(path: str) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffserve.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    torch.manual_seed(0)
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    transformer = _random_bf16(lambda: FluxTransformer2DModel(guidance_embeds=True))  # FLUX.1-dev's config
    # CLIP ViT-L/14's text tower.
    clip = _random_bf16(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    t5 = _t5_xxl_encoder(len(t5_tok))
    # black-forest-labs/FLUX.1-dev vae/config.json
    vae = _random_bf16(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        latent_channels=16, norm_num_groups=32, sample_size=1024, shift_factor=0.1159, scaling_factor=0.3611,
        use_quant_conv=False, use_post_quant_conv=False))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                 tokenizer_2=t5_tok, transformer=transformer).save_pretrained(path, max_shard_size="10GB")


def build_wan(path: str) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from diffserve.testing.tokenizers import build_t5_tokenizer

    torch.manual_seed(0)
    tokenizer = build_t5_tokenizer()
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json
    transformer = _random_bf16(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6))
    text_encoder = _t5_xxl_encoder(len(tokenizer), umt5=True)
    with torch.device("cuda"):
        vae = AutoencoderKLWan()  # the Wan2.1 VAE's architecture; float32, as the pipeline runs it
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer).save_pretrained(path, max_shard_size="10GB")


def ensure_checkpoint(path: str, build) -> None:
    if not os.path.exists(os.path.join(path, "model_index.json")):
        start = time.perf_counter()
        build(path)
        torch.cuda.empty_cache()
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)


# -- measurement -------------------------------------------------------------------------------------


def measure_mode(path: str, mode: str, engine_kwargs: dict, prompt: dict, params: dict, steps: int, repeats: int,
                 compare_steps: int) -> dict:
    from diffserve import Omni, OmniDiffusionSamplingParams

    def sampling(n: int, output_type: str) -> OmniDiffusionSamplingParams:
        return OmniDiffusionSamplingParams(num_inference_steps=n, **{**params, "output_type": output_type})

    start = time.perf_counter()
    with Omni(path, disable_progress_bar=True, **engine_kwargs, **MODES[mode]) as omni:
        load_s = time.perf_counter() - start
        dit_bytes = sum(omni.engine.executor.collective_rpc("dit_param_bytes")[0].values())
        omni.generate(prompt, sampling(2, "pt"))  # warm-up: compile, allocator, encoders prefetched by its decode
        runs = [omni.generate(prompt, sampling(steps, "pt"))[0].metrics for _ in range(repeats)]
        latent = omni.generate(prompt, sampling(compare_steps, "latent"))[0]
        latents = latent.frames if latent.frames is not None else latent.images
    median = sorted(runs, key=lambda m: m["e2e_s"])[len(runs) // 2]
    return {
        "mode": mode,
        "load_s": load_s,
        "step_ms": sorted(m["denoise_s"] / steps * 1000 for m in runs)[len(runs) // 2],
        "e2e_s": median["e2e_s"],
        "encode_s": median["encode_s"],
        "decode_s": median.get("decode_s"),
        "peak_gib": median.get("peak_gpu_bytes", 0) / GIB,
        "denoise_peak_gib": median.get("denoise_peak_gpu_bytes", 0) / GIB,
        "dit_gib": dit_bytes / GIB,
        "latents": latents.float().cpu(),
    }


def compare(results: list[dict]) -> list[dict]:
    """Ratios against the first mode (no offload) and bit-identity of the latents."""
    base = results[0]
    rows = []
    for r in results:
        diff = (r["latents"] - base["latents"]).abs()
        rows.append({k: v for k, v in r.items() if k != "latents"} | {
            "step_ratio": r["step_ms"] / base["step_ms"],
            "e2e_ratio": r["e2e_s"] / base["e2e_s"],
            "denoise_peak_share_of_dit": r["denoise_peak_gib"] / r["dit_gib"],
            "identical": bool(torch.equal(r["latents"], base["latents"])),
            "max_abs_vs_none": diff.max().item(),
        })
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    by_mode = {row["mode"]: row for row in rows}
    lines = []
    if "layerwise" in by_mode:
        row = by_mode["layerwise"]
        share, ratio = row["denoise_peak_share_of_dit"], row["step_ratio"]
        lines.append(f"layerwise: denoise peak {share:.0%} of the transformer's weight bytes (target <= "
                     f"{TARGETS['layerwise_peak_share']:.0%}: {'met' if share <= TARGETS['layerwise_peak_share'] else 'MISSED'}), "
                     f"step time {ratio:.2f}x (target <= {TARGETS['layerwise_step_ratio']}x: "
                     f"{'met' if ratio <= TARGETS['layerwise_step_ratio'] else 'MISSED'})")
    if "model" in by_mode:
        ratio = by_mode["model"]["e2e_ratio"]
        lines.append(f"model-level: end-to-end {ratio:.3f}x (target <= {TARGETS['model_e2e_ratio']}x: "
                     f"{'met' if ratio <= TARGETS['model_e2e_ratio'] else 'MISSED'})")
    return lines


def report(title: str, rows: list[dict], with_verdicts: bool = True) -> None:
    print(f"\n**{title}**\n")
    print("| mode | per-step ms | step vs none | e2e s | e2e vs none | peak GiB | denoise peak GiB | "
          "denoise peak / DiT bytes | latents identical | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        same = "yes" if r["identical"] else f"no (max-abs {r['max_abs_vs_none']:.2e})"
        print(f"| {r['mode']} | {r['step_ms']:.1f} | {r['step_ratio']:.2f}x | {r['e2e_s']:.2f} | {r['e2e_ratio']:.3f}x | "
              f"{r['peak_gib']:.2f} | {r['denoise_peak_gib']:.2f} | {r['denoise_peak_share_of_dit']:.0%} | {same} | "
              f"{r['load_s']:.0f} |")
    print()
    for line in verdicts(rows) if with_verdicts else ["(no GPU: no memory figures and no verdicts)"]:
        print(line)
    print(flush=True)


def model_setups(args) -> dict:
    size = 64 if args.tiny else 1024
    return {
        "flux": dict(
            title=f"FLUX.1-dev {size}x{size}, guidance 3.5, {args.flux_steps} steps",
            build=build_flux, ckpt=os.path.join(args.ckpt_dir, "flux-offload"), tiny="flux",
            prompt={"prompt": "a red fox in the snow, detailed fur"},
            params=dict(height=size, width=size, guidance_scale=3.5, max_sequence_length=512 if not args.tiny else 16,
                        seed=0),
            steps=args.flux_steps,
        ),
        "wan": dict(
            title=f"Wan2.1-T2V-14B {'832x480, 81' if not args.tiny else '32x32, 5'} frames, CFG 5.0, {args.wan_steps} steps",
            build=build_wan, ckpt=os.path.join(args.ckpt_dir, "wan14b-offload"), tiny="wan2.1-t2v",
            prompt={"prompt": "a red fox running through snow, cinematic", "negative_prompt": "blurry, static"},
            params=dict(height=480 if not args.tiny else 32, width=832 if not args.tiny else 32,
                        num_frames=81 if not args.tiny else 5, guidance_scale=5.0,
                        max_sequence_length=512 if not args.tiny else 16, seed=0),
            steps=args.wan_steps,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="flux,wan")
    parser.add_argument("--modes", default="none,model,layerwise", help="none must come first (the baseline)")
    parser.add_argument("--flux-steps", type=int, default=28, help="FLUX.1-dev's default")
    parser.add_argument("--wan-steps", type=int, default=10, help="Wan's default is 50: the e2e ratio is for these")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare-steps", type=int, default=2, help="steps of the latent-identity request")
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--ckpt-dir", default="/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--tiny", action="store_true", help="the tiny test checkpoints (a smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "none":
        parser.error("--modes must start with none (the baseline the others are compared with)")

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    engine = {"dtype": "bfloat16" if not args.tiny else "float32", "device": args.device, "enforce_eager": args.eager}
    out = {"device": device, "torch": torch.__version__, "args": vars(args), "targets": TARGETS, "models": {}}
    setups = model_setups(args)
    for name in args.models.split(","):
        setup = setups[name]
        if args.tiny:
            from diffserve.testing import make_tiny_checkpoint

            path = make_tiny_checkpoint(setup["tiny"], os.path.join(args.ckpt_dir, f"tiny-{setup['tiny']}"))
        else:
            path = setup["ckpt"]
            ensure_checkpoint(path, setup["build"])
        results = []
        for mode in modes:
            result = measure_mode(path, mode, engine, setup["prompt"], setup["params"], setup["steps"], args.repeats,
                                  args.compare_steps)
            print(f"{name} {mode}: step {result['step_ms']:.1f} ms, e2e {result['e2e_s']:.2f} s, "
                  f"peak {result['peak_gib']:.2f} GiB (denoise {result['denoise_peak_gib']:.2f})", flush=True)
            results.append(result)
        rows = compare(results)
        report(f"{setup['title']}, {'eager' if args.eager else 'regional torch.compile'}, {engine['dtype']}, {device}",
               rows, with_verdicts=args.device == "cuda")
        out["models"][name] = {"title": setup["title"], "rows": rows, "verdicts": verdicts(rows)}
        if not args.tiny and not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
