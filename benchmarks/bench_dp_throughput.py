"""Throughput of data parallelism: images/minute of N concurrent requests on one replica (one GPU)
against data_parallel_size=2 (two replicas, one GPU each), through the engine's serving front
(AsyncDiffusionEngine: the one scheduler, batching and replica routing `diffserve serve` uses, driven
in-process: no HTTP).

The checkpoint is bench_flux_parallel.py's: the real FLUX.1-dev transformer (random bf16 weights)
with small text encoders and VAE of the right widths, written once to --ckpt (reused by later runs and
by bench_flux_parallel). Each mode starts its engine, warms every replica up at the shapes the burst
runs (compilation is paid there, not timed), then times one burst of --requests requests submitted at
once (seed i for request i) until the last image is back. The images of both modes are compared.

    python benchmarks/bench_dp_throughput.py --json-out dp.json              # 2 GPUs: 1024x1024, 28 steps, 16 requests
    python benchmarks/bench_dp_throughput.py --tiny demo-dit --device cpu --dtype float32 --size 32 \
        --steps 2 --requests 4 --max-batch-size 2 --prompt "a red circle"                  # CPU smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time

import torch

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.engine.engine import replica_builders, warm_up
from diffserve.request import OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput



def checkpoint(args) -> str:
    if args.tiny:
        from diffserve.testing import make_tiny_checkpoint

        return make_tiny_checkpoint(args.tiny, tempfile.mkdtemp(prefix="bench-dp-"))
    from bench_flux_parallel import build_checkpoint
    from parallel_common import ensure_checkpoint

    ensure_checkpoint(args.ckpt, build_checkpoint)
    return args.ckpt


def requests(args) -> list[OmniDiffusionRequest]:
    # FLUX.1-dev is guidance-distilled: its guidance is an input, one transformer call per step.
    params = dict(height=args.size, width=args.size, num_inference_steps=args.steps, output_type="pt")
    return [OmniDiffusionRequest(prompts=[PromptInput(prompt=args.prompt, seed=i)],
                                 sampling_params=OmniDiffusionSamplingParams(seed=i, **params))
            for i in range(args.requests)]


async def burst(engine: AsyncDiffusionEngine, reqs: list[OmniDiffusionRequest]):
    return await asyncio.gather(*(engine.generate(req) for req in reqs))


def run_mode(path: str, replicas: int, args) -> tuple[dict, list[torch.Tensor]]:
    od_config = OmniDiffusionConfig.from_kwargs(
        path, data_parallel_size=replicas, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
        enforce_eager=args.eager, disable_progress_bar=True)
    # The burst's batches: full ones, and the remainder's size if the requests do not divide evenly.
    batches = sorted({args.max_batch_size, args.requests % args.max_batch_size} - {0})
    shapes = [(args.size, args.size, b) for b in batches]
    start = time.perf_counter()
    # A long batch wait: every request of the burst is queued before the first batch closes.
    engine = AsyncDiffusionEngine(replica_builders(od_config), max_queue=None, batch_wait_ms=100,
                                  step_timeout_s=None, warmup=lambda e: warm_up(e, shapes))
    try:
        engine.wait_until_all_loaded()
        if engine.load_exception is not None:
            raise engine.load_exception
        ready_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = asyncio.run(burst(engine, requests(args)))
        elapsed = time.perf_counter() - start
    finally:
        engine.shutdown()
    failed = [out.error for out in outputs if out.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) failed: {failed[0]}")
    served = [sum(out.metrics["replica"] == r for out in outputs) for r in range(replicas)]
    row = {"mode": "1 GPU" if replicas == 1 else f"DP {replicas}", "replicas": replicas,
           "images": len(outputs), "elapsed_s": elapsed, "images_per_minute": 60 * len(outputs) / elapsed,
           "served_per_replica": served, "load_and_warmup_s": ready_s,
           "mean_queue_s": sum(out.metrics.get("queue_s", 0.0) for out in outputs) / len(outputs)}
    return row, [out.images.float().cpu() for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/flux-bench", help="FLUX.1-dev random-weight checkpoint (written once)")
    parser.add_argument("--tiny", default=None, help="a tiny architecture instead (diffserve.testing), for a smoke run")
    parser.add_argument("--prompt", default="a red fox in the snow, detailed fur")
    parser.add_argument("--replicas", type=int, default=2, help="data-parallel replicas to compare with one")
    parser.add_argument("--requests", type=int, default=16, help="requests submitted at once")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda or cpu")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    path = checkpoint(args)
    rows, images = [], []
    for replicas in (1, args.replicas):
        if torch.cuda.is_available():  # the first mode's cached blocks on GPU 0 are the next one's
            gc.collect()
            torch.cuda.empty_cache()
        row, outs = run_mode(path, replicas, args)
        rows.append(row)
        images.append(outs)
        print(f"{row['mode']}: {row['images_per_minute']:.1f} images/minute ({row['elapsed_s']:.1f} s; served per "
              f"replica {row['served_per_replica']}; load + warm-up {row['load_and_warmup_s']:.1f} s)", flush=True)
    speedup = rows[1]["images_per_minute"] / rows[0]["images_per_minute"]
    max_abs = max((a - b).abs().max().item() for a, b in zip(*images))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    compile_note = "eager" if args.eager or device == "cpu" else "regional torch.compile"
    title = (f"{args.tiny or 'FLUX.1-dev'} {args.size}x{args.size}, {args.steps} steps, {args.requests} concurrent "
             f"requests, max batch {args.max_batch_size}, {compile_note}")
    print(f"\n**{title}**, {device}, torch {torch.__version__}\n")
    print("| mode | images/minute | burst s | served per replica |\n|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['images_per_minute']:.1f} | {row['elapsed_s']:.1f} | "
              f"{row['served_per_replica']} |")
    print(f"\nDP {args.replicas} vs 1 GPU: {speedup:.2f}x; largest pixel difference between the modes {max_abs:.2e}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"title": title, "device": device, "torch": torch.__version__, "args": vars(args), "rows": rows,
                       "speedup": speedup, "max_abs_diff_between_modes": max_abs}, f, indent=2)


if __name__ == "__main__":
    main()
