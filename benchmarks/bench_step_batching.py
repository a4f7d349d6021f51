"""Step-level against request-level batching under Poisson load: images/minute and request latency of
N clients arriving at random (a Poisson process) at one server, through the engine's serving front
(AsyncDiffusionEngine, driven in-process: no HTTP), for three engines on the same model:

- one at a time: max_batch_size=1, batching="request";
- request-level batching: max_batch_size=--max-batch-size, batching="request" (a batch forms when it
  starts and runs to its end);
- step-level batching: the same max_batch_size, batching="step" (requests join and leave the running
  batch between denoise steps), joining requests encoded and finished ones decoded inline on the
  step loop; --step-overlap on runs them on the worker's stage thread while the batch steps
  (step_overlap_stages=True), --step-overlap both runs both and reports the ratio;
- with --step-min-batch-gain X[,Y...]: step-level batching again per value, a request joining only
  while the bigger batch's measured step time per sample is at least that fraction lower
  (step_min_batch_gain), reported against step-level batching without it.

The model is FLUX.1-dev's real configs with random bf16 weights, built on the GPU at load, with no
checkpoint read or written (bench_offload's config folder and random fill); it loads once and each
mode's server runs on it in turn. Eager (no torch.compile). Per size: a 2-step warm-up request
(kernels, allocator), then one request of the full step count alone measures the one-at-a-time
service time s; arrivals
come at rate --load / s (default 1.5: the one-at-a-time server is overloaded, so queues form), the
same arrival times and seeds for every mode. Reported per mode: images/minute (requests / time from
the first arrival to the last answer), p50 and p99 latency (arrival to answer), mean occupancy
(samples per denoise step), preemptions, and the ratios to the other modes; the largest pixel
difference of step batching's images from one at a time's (bf16: batch size changes the rounding).

    python benchmarks/bench_step_batching.py --json-out step_batching.json      # one H200, ~8 min
    python benchmarks/bench_step_batching.py --sizes 512 --requests 16 --step-overlap both  # overlap's effect
    python benchmarks/bench_step_batching.py --sizes 512 --requests 16 --max-batch-size 16 --load 4 \
        --step-min-batch-gain 0.02,0.05                                         # the gain cap's effect
    python benchmarks/bench_step_batching.py --tiny --device cpu                 # CPU smoke, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import statistics
import tempfile
import time

import torch

from bench_offload import FLUX_DEV, install_random_weights, write_config_folder
from diffserve.config import OmniDiffusionConfig
from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.engine.engine import DiffusionEngine
from diffserve.request import OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput

PROMPT = "a red fox in the snow, detailed fur"
INLINE = "step-level, stages inline"
CAPPED = "step-level, gain-capped "  # + the gain


class ModeEngine(DiffusionEngine):
    """The loaded model under one mode's engine config; shutting that mode's server down leaves the
    workers to the next mode (one load for all three)."""

    def __init__(self, loaded: DiffusionEngine, **config):
        vars(self).update(vars(loaded))
        self.od_config = copy.copy(loaded.od_config)
        for key, value in config.items():
            setattr(self.od_config, key, value)

    def shutdown(self) -> None:
        pass


def modes(args) -> list[str]:
    """--step-overlap on: "step-level" overlaps its stages; off: it runs them inline; both: both. Then one
    gain-capped step-level mode per --step-min-batch-gain value."""
    return (["one at a time", "request-level", "step-level"] + ([INLINE] if args.step_overlap == "both" else [])
            + [f"{CAPPED}{gain}" for gain in args.step_min_batch_gain])


def mode_config(mode: str, args) -> dict:
    step = {"max_batch_size": args.max_batch_size, "batching": "step"}
    overlapped = {**step, "step_overlap_stages": args.step_overlap != "off"}
    if mode.startswith(CAPPED):
        return {**overlapped, "step_min_batch_gain": float(mode.removeprefix(CAPPED))}
    return {"one at a time": {"max_batch_size": 1, "batching": "request"},
            "request-level": {"max_batch_size": args.max_batch_size, "batching": "request"},
            "step-level": overlapped,
            INLINE: {**step, "step_overlap_stages": False}}[mode]


def load(args) -> DiffusionEngine:
    device = torch.device(args.device)
    if args.tiny:
        from diffserve.testing import make_tiny_checkpoint

        path = make_tiny_checkpoint("flux", tempfile.mkdtemp(prefix="bench-step-"))
    else:
        install_random_weights(device)
        path = write_config_folder("flux", os.path.join(args.dir, "flux-dev"), FLUX_DEV)
    dtype = "float32" if args.tiny else "bfloat16"
    return DiffusionEngine(OmniDiffusionConfig.from_kwargs(
        path, dtype=dtype, device=args.device, enforce_eager=True, disable_progress_bar=True))


def request(size: int, steps: int, seed: int, text: int) -> OmniDiffusionRequest:
    params = OmniDiffusionSamplingParams(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                                         max_sequence_length=text, seed=seed, output_type="pt")
    return OmniDiffusionRequest(prompts=[PromptInput(prompt=PROMPT, seed=seed)], sampling_params=params)


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each client arrives: exponential gaps of mean 1/rate."""
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


async def drive(server: AsyncDiffusionEngine, requests, arrivals) -> list[tuple]:
    """Each client sleeps until its arrival, submits and waits: (output, arrived at, answered at)."""
    start = time.perf_counter()

    async def client(req, at):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        arrived = time.perf_counter()
        out = await server.generate(req)
        return out, arrived, time.perf_counter()

    return await asyncio.gather(*(client(req, at) for req, at in zip(requests, arrivals)))


def run_mode(loaded: DiffusionEngine, mode: str, args, size: int, count: int, arrivals) -> tuple[dict, list]:
    engine = ModeEngine(loaded, **mode_config(mode, args))
    server = AsyncDiffusionEngine(engine, max_queue=None, step_timeout_s=None)
    occupancy = []  # samples per denoise step
    server.on_batch = lambda reqs, outs, elapsed: occupancy.extend([sum(len(r.prompts) for r in reqs)] * args.steps)
    server.on_step = lambda replica, samples, seconds: occupancy.append(samples)
    try:
        results = asyncio.run(drive(server, [request(size, args.steps, i, args.text) for i in range(count)], arrivals))
        preemptions = server.replicas[0].preemptions
    finally:
        server.shutdown()
    failed = [out.error for out, _, _ in results if out.error is not None]
    if failed:
        raise RuntimeError(f"{mode}: {len(failed)} request(s) failed: {failed[0]}")
    latencies = sorted(done - arrived for _, arrived, done in results)
    elapsed = max(done for _, _, done in results) - min(arrived for _, arrived, _ in results)
    row = {"mode": mode, **mode_config(mode, args), "requests": count, "elapsed_s": elapsed,
           "images_per_minute": 60 * count / elapsed, "p50_latency_s": statistics.median(latencies),
           "p99_latency_s": percentile(latencies, 0.99), "mean_latency_s": statistics.fmean(latencies),
           "mean_occupancy": statistics.fmean(occupancy), "steps_run": len(occupancy), "preemptions": preemptions}
    return row, [out.images.float().cpu() for out, _, _ in results]


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def service_seconds(loaded: DiffusionEngine, size: int, args) -> float:
    """One request alone at the full step count, after a 2-step warm-up at this size (kernels, allocator)."""
    seconds = 0.0
    for steps in (2, args.steps):
        start = time.perf_counter()
        out = loaded.run_batch([loaded.admit(request(size, steps, 0, args.text))])[0]
        if out.error is not None:
            raise RuntimeError(f"warm-up at {size}x{size} failed: {out.error}")
        seconds = time.perf_counter() - start
    return seconds


def run_size(loaded: DiffusionEngine, size: int, count: int, args) -> dict:
    service_s = service_seconds(loaded, size, args)
    rate = args.rate or args.load / service_s
    arrivals = arrival_times(count, rate, args.seed)
    print(f"\n{size}x{size}, {args.steps} steps: one request alone {service_s:.2f} s; {count} clients at "
          f"{rate:.3f}/s (last arrives at {arrivals[-1]:.1f} s)", flush=True)
    rows, images = [], {}
    for mode in modes(args):
        row, images[mode] = run_mode(loaded, mode, args, size, count, arrivals)
        rows.append(row)
        print(f"  {mode}: {row['images_per_minute']:.2f} images/min, p50 {row['p50_latency_s']:.1f} s, "
              f"p99 {row['p99_latency_s']:.1f} s, mean occupancy {row['mean_occupancy']:.2f}", flush=True)
    by_mode = {row["mode"]: row for row in rows}
    step, req, one = (by_mode[m] for m in ("step-level", "request-level", "one at a time"))
    ratios = {
        "throughput_step_vs_request": step["images_per_minute"] / req["images_per_minute"],
        "throughput_step_vs_one": step["images_per_minute"] / one["images_per_minute"],
        "throughput_request_vs_one": req["images_per_minute"] / one["images_per_minute"],
        "p50_step_vs_request": step["p50_latency_s"] / req["p50_latency_s"],
        "p99_step_vs_request": step["p99_latency_s"] / req["p99_latency_s"],
    }
    if INLINE in by_mode:
        inline = by_mode[INLINE]
        ratios.update({"throughput_overlap_vs_inline": step["images_per_minute"] / inline["images_per_minute"],
                       "p50_overlap_vs_inline": step["p50_latency_s"] / inline["p50_latency_s"],
                       "p99_overlap_vs_inline": step["p99_latency_s"] / inline["p99_latency_s"]})
    for mode in by_mode:
        if mode.startswith(CAPPED):
            ratios[mode] = {f"{metric}_vs_{base}": by_mode[mode][key] / by_mode[base_mode][key]
                            for base, base_mode in (("step", "step-level"), ("request", "request-level"))
                            for metric, key in (("throughput", "images_per_minute"), ("p50", "p50_latency_s"),
                                                ("p99", "p99_latency_s"))}
    max_abs = max((a - b).abs().max().item() for a, b in zip(images["step-level"], images["one at a time"]))
    return {"size": size, "requests": count, "service_s": service_s, "rate_per_s": rate, "arrivals_s": arrivals,
            "rows": rows, "ratios": ratios, "max_abs_step_vs_one": max_abs}


def capped_ratios(capped: dict, base: str) -> str:
    return (f"{base}-level: {capped[f'throughput_vs_{base}']:.2f}x images/min, p50 {capped[f'p50_vs_{base}']:.2f}x, "
            f"p99 {capped[f'p99_vs_{base}']:.2f}x")


def report(result: dict) -> None:
    print(f"\n**{result['title']}**, {result['device']}, torch {result['torch']}\n")
    for size in result["sizes"]:
        print(f"{size['size']}x{size['size']}: {size['requests']} clients, Poisson at {size['rate_per_s']:.3f}/s "
              f"(one request alone: {size['service_s']:.2f} s)\n")
        print("| mode | images/min | p50 s | p99 s | mean occupancy | preemptions |\n|---|---:|---:|---:|---:|---:|")
        for row in size["rows"]:
            print(f"| {row['mode']} | {row['images_per_minute']:.2f} | {row['p50_latency_s']:.1f} | "
                  f"{row['p99_latency_s']:.1f} | {row['mean_occupancy']:.2f} | {row['preemptions']} |")
        ratios = size["ratios"]
        print(f"\nstep vs request-level: {ratios['throughput_step_vs_request']:.2f}x images/min, p50 "
              f"{ratios['p50_step_vs_request']:.2f}x, p99 {ratios['p99_step_vs_request']:.2f}x; step vs one at a "
              f"time {ratios['throughput_step_vs_one']:.2f}x images/min; largest pixel difference of step-level "
              f"from one at a time {size['max_abs_step_vs_one']:.2e}\n")
        if "throughput_overlap_vs_inline" in ratios:
            print(f"step-level with overlapped stages vs inline: {ratios['throughput_overlap_vs_inline']:.2f}x "
                  f"images/min, p50 {ratios['p50_overlap_vs_inline']:.2f}x, "
                  f"p99 {ratios['p99_overlap_vs_inline']:.2f}x\n")
        for mode, capped in ratios.items():
            if mode.startswith(CAPPED):
                print(f"{mode} vs " + "; vs ".join(capped_ratios(capped, base) for base in ("step", "request")) + "\n")


def gains(text: str) -> list[float]:
    """--step-min-batch-gain's comma-separated fractions, each strictly between 0 and 1."""
    try:
        values = [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 < value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"each gain must be between 0 and 1, exclusive, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated square sizes (default 512,1024; tiny: 64)")
    parser.add_argument("--requests", default=None,
                        help="clients per size, comma-separated like --sizes (default 16,8; tiny: 6)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; tiny: 4)")
    parser.add_argument("--max-batch-size", type=int, default=4, help="of the two batching modes")
    parser.add_argument("--load", type=float, default=1.5,
                        help="arrival rate in units of the one-at-a-time service rate (1 / one request's time)")
    parser.add_argument("--rate", type=float, default=None,
                        help="arrivals per second instead of --load (tiny default: 20, a burst)")
    parser.add_argument("--seed", type=int, default=0, help="of the arrival times")
    parser.add_argument("--text", type=int, default=None, help="max_sequence_length (default 512; tiny: 32)")
    parser.add_argument("--dir", default="/tmp/bench_step_batching", help="where the config folder goes")
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX test checkpoint (a smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--step-overlap", choices=("on", "off", "both"), default="off",
                        help="step-level mode: encode/decode on the stage thread (on), inline (off), or both modes")
    parser.add_argument("--step-min-batch-gain", type=gains, default=[], metavar="GAIN[,GAIN...]",
                        help="add a step-level mode per value with step_min_batch_gain=GAIN (0 < GAIN < 1): a "
                             "request joins only while the bigger batch's measured step time per sample is that "
                             "fraction lower")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("64" if args.tiny else "512,1024")).split(",")]
    counts = [int(n) for n in (args.requests or ("6" if args.tiny else "16,8")).split(",")]
    if len(counts) != len(sizes):
        parser.error(f"--requests needs one count per size ({len(sizes)}), got {len(counts)}")
    args.steps = args.steps or (4 if args.tiny else 28)
    args.text = args.text or (32 if args.tiny else 512)
    if args.tiny and args.rate is None:
        args.rate = 20.0

    loaded = load(args)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {"title": f"{'tiny FLUX' if args.tiny else 'FLUX.1-dev (random bf16 weights)'}, {args.steps} steps, "
                       f"max batch {args.max_batch_size}, eager",
              "device": device, "torch": torch.__version__, "args": vars(args), "sizes": []}
    try:
        for size, count in zip(sizes, counts):
            result["sizes"].append(run_size(loaded, size, count, args))
            if args.json_out:  # after each size: a run cut short keeps what it measured
                with open(args.json_out, "w") as f:
                    json.dump(result, f, indent=2)
    finally:
        loaded.shutdown()
    report(result)


if __name__ == "__main__":
    main()
