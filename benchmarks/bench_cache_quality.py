"""Step-cache speed and quality on trained weights (the built-in demo model): for each backend and
setting, the time per image, the steps skipped, PSNR and SSIM against the uncached image of the same
caption and seed, and the detector's accuracy (does the image still show what its caption asks?).

    python benchmarks/bench_cache_quality.py                      # docs/cache.md's table
    python benchmarks/bench_cache_quality.py --modes none cache_dit "tea_cache:rel_l1_thresh=0.03" \
        "cache_dit:residual_diff_threshold=0.4,calibrator=taylorseer" --rounds 3 --json-out r.json

A mode is `none`, a backend at the model's defaults (`cache_dit`, `tea_cache`), or a backend with
cache_config keys `backend:key=value,key=value` (values are JSON: numbers, strings, true/false).
The captions are held-out *test* captions (never trained on; TeaCache's coefficients were fitted on
the validation captions), caption i with seed `--first-seed + i`, 64x64, the model's 20 steps and CFG;
`--split validation` takes the validation captions instead, to check a setting chosen on the test ones.

Timing: every mode runs once per round in a fresh engine (a warm-up request first), rounds
alternating, and a mode's time is the median over rounds of its median per image: on a shared CPU
the speed drifts between identical runs, and a drift then hits all modes alike. Skipped steps and
image quality do not depend on the round. `--device cuda` runs the same on a GPU (where the tiny demo
model is launch-bound, so the times there say little).

On a CPU shared with other processes torch runs one thread by default here (`--threads`): on the
2-core development machine under a load of ~15, one demo image took 3-4 s with one thread and
34-95 s with two, whose OpenMP team waits for a descheduled thread at every barrier. Under such
load even one thread's wall time varied 2-4x between identical rounds; `--clock cpu` times each image
by this process's CPU time instead (one thread: the work itself, not the waits for a core).
Even so, the machine's speed drifted between states for seconds at a time (the same uncached image
1.2 s or 1.45 s): with one mode per stretch, a mode's round caught one state or the other and a
speedup moved by up to 0.5x between runs. `--interleave` keeps every mode's engine open and runs
each image in every mode in turn, so the drift hits all modes alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.assets import default_model_path
from diffserve.demo import detector, scenes

# docs/cache.md's table: the model's defaults, the fastest setting found at >= 30 dB (steps 0-6 run
# with CFG, step 12 runs the conditional branch alone, the others reuse the last output and run nothing
# of the transformer), the fastest with the TeaCache signal (steps 0-6 and 17 run), the fastest
# reusing the residual, and the defaults they replaced.
DEFAULT_MODES = [
    "none",
    "cache_dit",
    "tea_cache",
    "tea_cache:reuse=output,calibrator=none,fixed_schedule=true,warmup_steps=7,max_continuous_cached_steps=-1,"
    "compute_last_step=false,cfg_truncation_step=12",
    "tea_cache:reuse=output,calibrator=none,rel_l1_thresh=1,warmup_steps=7,max_continuous_cached_steps=10,"
    "compute_last_step=false",
    "tea_cache:rel_l1_thresh=1,max_continuous_cached_steps=4",
    "cache_dit:max_warmup_steps=4,residual_diff_threshold=0.24,calibrator=none",
    "tea_cache:rel_l1_thresh=0.03,warmup_steps=1,max_continuous_cached_steps=-1,calibrator=none",
]


def parse_mode(mode: str) -> tuple[str | None, dict]:
    """'none' | 'cache_dit' | 'tea_cache', optionally ':key=value,...' -> (cache_backend, cache_config)."""
    backend, _, settings = mode.partition(":")
    if backend not in ("none", "cache_dit", "tea_cache"):
        raise ValueError(f"unknown mode {mode!r}: use none, cache_dit[:k=v,...] or tea_cache[:k=v,...]")
    config = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"mode {mode!r}: expected key=value, got {item!r}")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value  # a bare string such as calibrator=taylorseer
    if backend == "none":
        if config:
            raise ValueError("mode 'none' takes no settings")
        return None, {}
    return backend, config


# --clock: wall time, or this process's CPU time (the engine runs in-process on one device).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def generate(
    omni: Omni, captions: list[str], seeds: list[int], clock=time.perf_counter
) -> tuple[np.ndarray, list[float], list[int]]:
    """uint8 images [N, H, W, 3], seconds per image, cached steps per image."""
    images, times, cached = [], [], []
    for caption, seed in zip(captions, seeds):
        start = clock()
        out = omni.generate(caption, OmniDiffusionSamplingParams(seed=seed))[0]
        times.append(clock() - start)
        images.append(np.asarray(out.images[0]))
        cached.append(out.metrics.get("cached_steps", 0))
    return np.stack(images), times, cached


def open_engine(mode: str, device: str, warmup: tuple[str, int]) -> Omni:
    """A fresh engine for `mode`, after one warm-up request (caption, seed)."""
    backend, config = parse_mode(mode)
    engine = {"cache_backend": backend, "cache_config": config} if backend else {}
    omni = Omni(default_model_path(), dtype="float32", device=device, disable_progress_bar=True, **engine)
    generate(omni, [warmup[0]], [warmup[1]])
    return omni


def run_mode(mode: str, captions: list[str], seeds: list[int], device: str, clock=time.perf_counter) -> dict:
    with open_engine(mode, device, (captions[0], seeds[0] + 1000)) as omni:
        images, times, cached = generate(omni, captions, seeds, clock)
    return {"images": images, "seconds": statistics.median(times), "cached": cached}


def run_interleaved(modes: list[str], captions: list[str], seeds: list[int], device: str,
                    clock=time.perf_counter) -> dict[str, dict]:
    """One round with every mode's engine open: each image runs in every mode in turn, so a drift of
    a shared CPU's speed (seconds long) hits all modes alike instead of whichever mode ran then."""
    with contextlib.ExitStack() as stack:
        engines = {mode: stack.enter_context(open_engine(mode, device, (captions[0], seeds[0] + 1000)))
                   for mode in modes}
        per_image = {mode: [] for mode in modes}
        for caption, seed in zip(captions, seeds):
            for mode, omni in engines.items():
                per_image[mode].append(generate(omni, [caption], [seed], clock))
    results = {}
    for mode, runs in per_image.items():
        times = [t for _, ts, _ in runs for t in ts]
        results[mode] = {"images": np.concatenate([im for im, _, _ in runs]), "seconds": statistics.median(times),
                         "cached": [c for _, _, cs in runs for c in cs]}
    return results


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of two uint8
    [H, W, 3] images, averaged over the valid window positions and the channels."""
    x, y = (torch.from_numpy(im).double().permute(2, 0, 1)[:, None] for im in (a, b))
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def summarize(mode: str, runs: list[dict], baseline: dict, baseline_seconds: float, captions: list[str]) -> dict:
    images, cached = runs[0]["images"], runs[0]["cached"]
    seconds = statistics.median(r["seconds"] for r in runs)
    psnrs = [psnr(a, b) for a, b in zip(images, baseline["images"])]
    ssims = [ssim(a, b) for a, b in zip(images, baseline["images"])]
    return {
        "mode": mode,
        "seconds_per_image": seconds,
        "seconds_per_round": [r["seconds"] for r in runs],
        "speedup": baseline_seconds / seconds,
        "cached_steps": cached,
        "psnr_db_mean": float(np.mean(psnrs)),
        "psnr_db_worst": min(psnrs),
        "ssim_mean": float(np.mean(ssims)),
        "ssim_worst": min(ssims),
        "detector_accuracy": detector.score_images(images, captions)[0],
    }


def print_table(rows: list[dict], args, num_captions: int) -> None:
    print(f"\n**Demo model, {num_captions} held-out {args.split} captions (seeds {args.first_seed}-"
          f"{args.first_seed + num_captions - 1}), 64x64, 20 steps, CFG; {args.device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.clock} time), median of "
          f"{args.rounds} alternating rounds{', interleaved per image' if args.interleave else ''}**\n")
    print("| mode | s / image | speedup | cached steps (of 20) | PSNR mean / worst | SSIM mean / worst | detector |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cached = f"{np.mean(r['cached_steps']):.1f} ({min(r['cached_steps'])}-{max(r['cached_steps'])})"
        quality = "-" if r["mode"] == "none" else (
            f"{r['psnr_db_mean']:.1f} / {r['psnr_db_worst']:.1f} dB | {r['ssim_mean']:.3f} / {r['ssim_worst']:.3f}")
        if r["mode"] == "none":
            quality += " | -"
        print(f"| `{r['mode']}` | {r['seconds_per_image']:.3f} | {r['speedup']:.2f}x | {cached} | {quality} | "
              f"{r['detector_accuracy']:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES)
    parser.add_argument("--captions", type=int, default=6, help="how many held-out captions (of 20)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="validation: check that a setting chosen on the test captions holds on others")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of all modes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on cpu; see the module docstring)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: this process's CPU time, for a CPU shared with other processes (one thread)")
    parser.add_argument("--interleave", action="store_true",
                        help="keep every mode's engine open and run each image in every mode in turn")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if args.threads is not None or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)

    modes = args.modes if args.modes[0] == "none" else ["none", *args.modes]
    for mode in modes:
        parse_mode(mode)  # fail on a typo before the first engine loads
    captions = scenes.held_out_captions(args.split)[: args.captions]
    seeds = [args.first_seed + i for i in range(len(captions))]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        interleaved = {}
        if args.interleave:
            interleaved = run_interleaved(modes, captions, seeds, args.device, CLOCKS[args.clock])
        for mode in modes:
            runs[mode].append(interleaved.get(mode) or run_mode(mode, captions, seeds, args.device, CLOCKS[args.clock]))
            print(f"round {round_index + 1}: {mode}: {runs[mode][-1]['seconds']:.3f} s / image, cached "
                  f"{runs[mode][-1]['cached']}", flush=True)
    baseline_seconds = statistics.median(r["seconds"] for r in runs["none"])
    rows = [summarize(mode, runs[mode], runs["none"][0], baseline_seconds, captions) for mode in modes]
    print_table(rows, args, len(captions))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": args.device, "cpu": platform.processor() or
                       platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
