"""Where does one FLUX.1-dev double + single block spend its GPU time, ours vs diffusers (eager)?

Builds a 1+1-block model with the real FLUX.1-dev widths (random bf16 weights), loads the same
weights into ours, and prints the torch profiler's top CUDA kernels for each, so a latency gap can
be traced to kernels rather than guessed.

    python benchmarks/profile_flux_blocks.py [--attn-backend sdpa_cudnn] [--rows 20]
"""

from __future__ import annotations

import argparse

import torch


def build(attn_backend: str | None):
    from diffusers import FluxTransformer2DModel as Reference

    from diffserve.layers.attention import select_attention_backend, set_attention_backend
    from diffserve.loader.diffusers_loader import materialize_meta_tensors
    from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.set_default_dtype(dtype)
    with device:
        ref = Reference(num_layers=1, num_single_layers=1, guidance_embeds=True).eval()
    torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        ours = FluxTransformer2DModel(FluxTransformerConfig(num_layers=1, num_single_layers=1, guidance_embeds=True))
    ours = ours.to(dtype)
    materialize_meta_tensors(ours, device)
    ours.load_weights(ref.state_dict().items())
    set_attention_backend(ours, select_attention_backend(attn_backend, device, dtype))
    return ref, ours.eval()


def inputs(batch=1, img=4096, txt=512):
    g = torch.Generator("cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    return dict(
        hidden_states=torch.randn(batch, img, 64, **kw),
        encoder_hidden_states=torch.randn(batch, txt, 4096, **kw),
        pooled_projections=torch.randn(batch, 768, **kw),
        timestep=torch.full((batch,), 0.5, device="cuda", dtype=torch.bfloat16),
        guidance=torch.full((batch,), 3.5, device="cuda", dtype=torch.float32),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(64.0), torch.arange(64.0), indexing="ij"),
                            -1).reshape(-1, 3).cuda(),
        txt_ids=torch.zeros(txt, 3, device="cuda"),
    )


def profile(name: str, fn, rows: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        fn()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n=== {name}: {ms:.2f} ms per 1+1-block forward ===")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn-backend", default=None)
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    ref, ours = build(args.attn_backend)
    x = inputs()
    ours_kwargs = dict(x)
    with torch.inference_mode():
        a = profile("diffusers", lambda: ref(**x, return_dict=False)[0], args.rows)
        b = profile(f"diffserve ({args.attn_backend or 'sdpa'})", lambda: ours(**ours_kwargs), args.rows)
    print(f"\ndiffusers {a:.2f} ms, diffserve {b:.2f} ms, ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
