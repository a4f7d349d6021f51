"""FLUX.1-dev through the whole engine on one GPU and in parallel modes (TP, CFG parallel, Ulysses,
ring, and their mixes; true CFG on): per-step latency and agreement with the one-GPU output.

The checkpoint is written first: the real FLUX.1-dev transformer (11.9B parameters, random bf16
weights, 1-D parameters perturbed), with small random text encoders and VAE of the right widths
(T5 d_model 4096, CLIP 768, 16 latent channels, VAE factor 8), so the transformer dominates as it
does with the real model. Each mode then runs in a fresh engine (benchmarks/parallel_common.py): a
2-step warm-up (compile) and timed requests; the per-step time is the denoise stage time over the steps.

    python benchmarks/bench_flux_parallel.py --ckpt /tmp/flux-bench --modes 1gpu,tp2,cfg2 --json-out r.json
"""

from __future__ import annotations

import argparse

import torch

from parallel_common import compare, ensure_checkpoint, report, run_mode, world_size


def build_checkpoint(path: str, seed: int = 0) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffserve.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    torch.manual_seed(seed)
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 12B parameters: never allocate them in fp32
    try:
        with torch.device("cuda"):
            transformer = FluxTransformer2DModel(guidance_embeds=True)
            with torch.no_grad():
                for p in transformer.parameters():
                    if p.dim() == 1:
                        p.add_(torch.randn_like(p) * 0.05)
    finally:
        torch.set_default_dtype(default_dtype)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=768, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                        projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=64, num_layers=1,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32],
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, shift_factor=0.1159,
                        scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.to(torch.bfloat16), text_encoder=clip.to(torch.bfloat16),
                        tokenizer=clip_tok, text_encoder_2=t5.to(torch.bfloat16), tokenizer_2=t5_tok,
                        transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe, transformer
    torch.cuda.empty_cache()


MODES = {
    "1gpu": {},
    "tp2": {"tensor_parallel_size": 2},
    "cfg2": {"cfg_parallel_size": 2},
    "ulysses2": {"ulysses_degree": 2},
    "ring2": {"ring_degree": 2},
    "tp4": {"tensor_parallel_size": 4},
    "ulysses4": {"ulysses_degree": 4},
    "ring4": {"ring_degree": 4},
    "ulysses2xring2": {"ulysses_degree": 2, "ring_degree": 2},
    "cfg2xulysses2": {"cfg_parallel_size": 2, "ulysses_degree": 2},
    "tp8": {"tensor_parallel_size": 8},
    "ulysses8": {"ulysses_degree": 8},
    "cfg2xulysses4": {"cfg_parallel_size": 2, "ulysses_degree": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/flux-bench")
    parser.add_argument("--modes", default="1gpu,tp2,cfg2")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    ensure_checkpoint(args.ckpt, build_checkpoint)

    prompt = {"prompt": "a red fox in the snow, detailed fur", "negative_prompt": "blurry, low quality"}
    params = dict(height=args.size, width=args.size, max_sequence_length=512, true_cfg_scale=4.0,
                  guidance_scale=3.5, seed=0, output_type="pt")
    results = []
    for mode in args.modes.split(","):
        engine = {**MODES[mode], "enforce_eager": args.eager}
        result = run_mode(args.ckpt, mode, engine, prompt, params, args.steps, 2, args.repeats)
        result["gpus"] = world_size(MODES[mode])
        print(f"{mode}: load {result['load_s']:.1f} s, step {result['step_ms']:.1f} ms", flush=True)
        results.append(result)
    compile_note = "eager" if args.eager else "regional torch.compile"
    report(compare(results), f"FLUX.1-dev pipeline, {args.size}x{args.size}, true CFG 4.0, {args.steps} steps, "
           f"{compile_note}", args, args.json_out)


if __name__ == "__main__":
    main()
