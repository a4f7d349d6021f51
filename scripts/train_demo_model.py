#!/usr/bin/env python3
"""Train diffserve's built-in demo model: a small text-to-image DiT in pixel space, on procedurally
generated scenes of coloured shapes ("a red circle above a blue square on a white background").

    python scripts/train_demo_model.py --out DIR [--minutes 8] [--device cuda] [--seed 0]
    python scripts/train_demo_model.py --out /tmp/smoke --smoke          # CPU, well under a minute

It writes a diffusers-style checkpoint folder to --out (model_index.json, transformer/,
text_encoder/, tokenizer/, scheduler/; EMA weights in float16 safetensors) that diffserve loads as
`DiffservePixelDiTPipeline`, and a report folder (--report-dir, default DIR-report: loss.csv,
loss_curve.png, samples.png, training_info.json, REPORT.md).

What it does:
- data: layouts and captions sampled with numpy in a background thread (scenes.py), rendered on the
  device; layouts held out for evaluation are never drawn; 10% of captions are dropped to "" so the
  model learns the unconditional branch of classifier-free guidance;
- model: diffserve.demo.reference (plain PyTorch, the same code the conformance test
  compares our port against), trained with rectified flow (x_t = (1-t) x0 + t noise, target
  noise - x0), AdamW, warmup + cosine decay, an EMA of the weights, bf16 autocast and torch.compile
  on CUDA;
- time: with --minutes only, it measures its speed after a short warm-up and fixes the number of steps
  to fill the budget (the report gives the --steps that reproduces the run); --steps fixes it outright;
- after training: picks the default guidance scale and schedule shift on held-out *validation*
  layouts, writes them into the checkpoint, and scores held-out *test* layouts with the detector the
  quality test uses (diffserve.demo.detector).

Needs torch, numpy, PIL, safetensors, tokenizers and transformers; not diffusers.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import json
import math
import os
import platform
import queue
import shlex
import subprocess
import sys
import textwrap
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))  # runs from a checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffserve.demo import detector, scenes  # noqa: E402
from diffserve.models.demo_dit import captions  # noqa: E402
from diffserve.models.spec import DEFAULTS_KEY  # noqa: E402
from diffserve.models.demo_dit.configs import DEFAULT_NUM_INFERENCE_STEPS, DemoDiTConfig  # noqa: E402
from diffserve.demo.reference import (  # noqa: E402
    ReferenceDiT,
    ReferenceTextEncoder,
    default_text_encoder_config,
    load_pipeline,
    save_pipeline,
    scheduler_config,
)

PRESETS = {
    # 6.5M parameters: 13.0 MB of float16 weights; 20 CFG steps at 64x64 take ~0.9 s on 2 CPU cores.
    "default": lambda: (DemoDiTConfig(), default_text_encoder_config()),
    # ~0.8M parameters, for trying the recipe on a CPU in minutes.
    "small": lambda: (
        DemoDiTConfig(num_layers=4, num_attention_heads=3, attention_head_dim=32, text_dim=96),
        default_text_encoder_config(hidden_size=96, num_layers=1, num_attention_heads=3),
    ),
    # For smoke runs: seconds on a CPU (too narrow to denoise 4x4x3 patches; checks the plumbing only).
    "tiny": lambda: (
        DemoDiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, text_dim=32, rope_axes_dim=(8, 8)),
        default_text_encoder_config(hidden_size=32, num_layers=1, num_attention_heads=2),
    ),
}
GUIDANCE_GRID = (2.0, 3.0, 4.5, 6.0)
SHIFT_GRID = (1.0, 2.0, 3.0)
QUALITY_TEST_SEEDS = (0, 1)  # the seeds tests/models/demo_dit/test_quality.py uses


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--report-dir", default=None, help="report folder (default: OUT-report)")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget for the whole run (default 8)")
    p.add_argument("--steps", type=int, default=None, help="exact number of training steps (overrides the budget)")
    p.add_argument(
        "--schedule-steps", type=int, default=None, help="length of the learning-rate schedule (default: --steps)"
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds data, initialization and noise (default 0)")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="default", help="model size (default: default, 6.5M parameters)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    p.add_argument("--lr", type=float, default=6e-4, help="peak AdamW learning rate (default 6e-4)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 500, at most a fifth of --steps)")
    p.add_argument("--ema", type=float, default=0.9995, help="EMA decay of the saved weights (default 0.9995)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (default 0.1)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile on CUDA")
    p.add_argument(
        "--reserve-seconds", type=float, default=None, help="budget kept for eval and saving (default 75 s on CUDA)"
    )
    p.add_argument(
        "--eval-seeds", type=int, default=8, help="images per held-out caption in the evaluation (default 8)"
    )
    p.add_argument("--weights-dtype", choices=["float16", "float32"], default="float16", help="default float16")
    p.add_argument("--log-every", type=int, default=25, help="steps per loss log row (default 25)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 50 steps, batch 16, minimal evaluation")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset = "tiny"
        args.steps = args.steps or 50
        args.batch_size = args.batch_size or 16
        args.eval_seeds = min(args.eval_seeds, 1)
        args.log_every = min(args.log_every, 10)
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (256 if cuda else 16)
    args.reserve_seconds = args.reserve_seconds if args.reserve_seconds is not None else (75.0 if cuda else 10.0)
    args.report_dir = args.report_dir or args.out.rstrip("/") + "-report"
    if args.warmup is None:
        length = args.schedule_steps or args.steps
        args.warmup = 500 if length is None else min(500, max(1, length // 5))
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


# -- data -------------------------------------------------------------------------------------------


class BatchProducer:
    """Scenes and token ids for training batches, made in a background thread (numpy + Python) while
    the device trains; one seeded generator, so the sequence of batches is reproducible."""

    def __init__(self, tokenizer, seed: int, batch_size: int, caption_dropout: float, max_length: int, pin: bool):
        self.tokenizer, self.batch_size, self.dropout, self.max_length, self.pin = (
            tokenizer,
            batch_size,
            caption_dropout,
            max_length,
            pin,
        )
        self.rng = np.random.default_rng(seed)
        self.ids_cache: dict[str, torch.Tensor] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=6)
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _ids(self, caption: str) -> torch.Tensor:
        if caption not in self.ids_cache:
            self.ids_cache[caption] = captions.tokenize(self.tokenizer, [caption], self.max_length)[0]
        return self.ids_cache[caption]

    def _make(self):
        batch = scenes.sample_scenes(self.rng, self.batch_size)
        drop = self.rng.random(self.batch_size) < self.dropout
        ids = torch.stack([self._ids("" if d else c) for c, d in zip(batch.captions, drop)])
        arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in scenes.scene_arrays(batch).items()}
        if self.pin:
            arrays = {k: v.pin_memory() for k, v in arrays.items()}
            ids = ids.pin_memory()
        return arrays, ids

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                item = self._make()
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced in next()
            self.error = exc

    def next(self, device: torch.device):
        while True:
            if self.error is not None:
                raise RuntimeError("the batch producer failed") from self.error
            try:
                arrays, ids = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                continue
        arrays = {k: v.to(device, non_blocking=True) for k, v in arrays.items()}
        images = scenes.render(arrays, scenes.IMAGE_SIZE) * 2 - 1
        return images, ids.to(device, non_blocking=True)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


# -- training ---------------------------------------------------------------------------------------


def learning_rate(step: int, base: float, warmup: int, total: int | None) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / (total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_flow_time(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """70% logit-normal (most steps where the loss is informative), 30% uniform (keeps t near 1, where
    the layout is decided, and near 0 covered)."""
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    uniform = torch.rand(batch, generator=generator, device=device)
    pick = torch.rand(batch, generator=generator, device=device) < 0.7
    return torch.where(pick, logit_normal, uniform)


class Trainer:
    def __init__(self, args, transformer: ReferenceDiT, text_encoder: ReferenceTextEncoder, device: torch.device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        self.transformer, self.text_encoder = transformer, text_encoder
        self.ema_transformer = copy.deepcopy(transformer).requires_grad_(False)
        self.ema_text_encoder = copy.deepcopy(text_encoder).requires_grad_(False)
        self.params = [p for m in (transformer, text_encoder) for p in m.parameters()]
        self.ema_params = [p for m in (self.ema_transformer, self.ema_text_encoder) for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, **({"fused": True} if self.cuda else {})
        )
        self.generator = torch.Generator(device).manual_seed(args.seed + 1)
        self.compiled = self.cuda and not args.no_compile
        self.forward = torch.compile(self._loss, dynamic=False) if self.compiled else self._loss

    def _loss(self, x0: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t4 = t[:, None, None, None]
        xt = (1 - t4) * x0 + t4 * noise
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            text, pooled = self.text_encoder(ids)
            pred = self.transformer(xt, t, text, pooled)
        return F.mse_loss(pred.float(), noise - x0)

    def step(self, step: int, x0: torch.Tensor, ids: torch.Tensor, total: int | None) -> torch.Tensor:
        lr = learning_rate(step, self.args.lr, self.args.warmup, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        t = sample_flow_time(x0.shape[0], self.generator, self.device)
        try:
            loss = self.forward(x0, ids, noise, t)
            loss.backward()  # the backward graph may be compiled lazily, here
        except Exception as exc:  # a compiler failure must not cost the run
            if not self.compiled or step > 0:
                raise
            print(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", flush=True)
            self.optimizer.zero_grad(set_to_none=True)
            self.forward, self.compiled = self._loss, False
            loss = self.forward(x0, ids, noise, t)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        decay = min(self.args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        return loss.detach()


def run_training(args, trainer: Trainer, producer: BatchProducer, deadline: float, report_dir: str):
    """Train until --steps or the deadline; returns (steps done, loss log rows, planned total)."""
    total = args.steps
    schedule = args.schedule_steps or args.steps
    calibrate_at, calibrate_from = 100, None
    rows, loss_sum, loss_count = [], torch.zeros((), device=trainer.device), 0
    start = time.perf_counter()
    step = 0
    while True:
        if total is not None and step >= total:
            break
        if args.steps is None and time.perf_counter() > deadline:
            print(f"time budget reached at step {step}", flush=True)
            break
        x0, ids = producer.next(trainer.device)
        loss_sum += trainer.step(step, x0, ids, schedule)
        loss_count += 1
        step += 1
        if args.steps is None and step == 20:  # past compilation: time the steady state from here
            sync(trainer.device)
            calibrate_from = time.perf_counter()
        if args.steps is None and step == calibrate_at:
            sync(trainer.device)
            per_step = (time.perf_counter() - calibrate_from) / (calibrate_at - 20)
            total = schedule = step + max(0, int((deadline - time.perf_counter()) / per_step))
            print(f"{per_step * 1000:.1f} ms/step: planning {total} steps to fit the budget", flush=True)
        if step % args.log_every == 0 or step == total:
            mean = (loss_sum / loss_count).item()  # the one host sync, every log_every steps
            elapsed = time.perf_counter() - start
            lr = trainer.optimizer.param_groups[0]["lr"]
            rows.append({"step": step, "loss": mean, "lr": lr, "elapsed_s": round(elapsed, 2)})
            print(
                f"step {step:6d}  loss {mean:.4f}  lr {lr:.2e}  {step * args.batch_size / elapsed:8.0f} img/s",
                flush=True,
            )
            loss_sum.zero_()
            loss_count = 0
    sync(trainer.device)
    with open(os.path.join(report_dir, "loss.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "elapsed_s"])
        writer.writeheader()
        writer.writerows(rows)
    return step, rows, total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- evaluation -------------------------------------------------------------------------------------


def generate(pipe, captions: list[str], seeds: list[int], batch: int = 160, **kwargs) -> np.ndarray:
    """uint8 images [len(captions) * len(seeds), H, W, 3], caption-major."""
    prompts = [c for c in captions for _ in seeds]
    prompt_seeds = [s for _ in captions for s in seeds]
    out = []
    for i in range(0, len(prompts), batch):
        images = pipe(prompts[i : i + batch], prompt_seeds[i : i + batch], **kwargs)
        out.append(scenes.to_uint8(images))
    return np.concatenate(out)


def accuracy(pipe, captions: list[str], seeds: list[int], **kwargs) -> tuple[float, np.ndarray]:
    images = generate(pipe, captions, seeds, **kwargs)
    score, _ = detector.score_images(images, [c for c in captions for _ in seeds])
    return score, images


def choose_defaults(pipe, args, smoke: bool) -> tuple[float, float, list[dict]]:
    """(guidance, shift) with the best detector score on the held-out validation layouts."""
    captions = scenes.held_out_captions("validation")
    seeds = list(range(1000, 1000 + max(1, args.eval_seeds // 2)))
    grid = [(4.0, 1.0)] if smoke else [(g, s) for s in SHIFT_GRID for g in GUIDANCE_GRID]
    if smoke:
        captions = captions[:4]
    results = []
    for guidance, shift in grid:
        pipe.shift = shift
        score, _ = accuracy(pipe, captions, seeds, guidance_scale=guidance)
        results.append({"guidance_scale": guidance, "shift": shift, "validation_accuracy": score})
        print(f"validation: guidance {guidance} shift {shift}: {score:.3f}", flush=True)
    best = max(results, key=lambda r: (r["validation_accuracy"], -abs(r["guidance_scale"] - 4.0), -r["shift"]))
    return best["guidance_scale"], best["shift"], results


def set_checkpoint_defaults(out: str, guidance: float, shift: float) -> None:
    index_path = os.path.join(out, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index[DEFAULTS_KEY]["guidance_scale"] = guidance
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config(shift), f, indent=2)
        f.write("\n")


# -- pictures (PIL only: the GPU machine may have no matplotlib) --------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def plot_loss(rows: list[dict], path: str, title: str) -> None:
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 500, 80, 20, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(14)
    draw.text((left, 10), title, fill="black", font=font)
    if rows:
        steps = np.array([r["step"] for r in rows], dtype=float)
        losses = np.log10(np.maximum([r["loss"] for r in rows], 1e-8))
        lo, hi = math.floor(losses.min() * 10) / 10, math.ceil(losses.max() * 10) / 10 + 1e-9
        x_max = max(steps.max(), 1)

        def xy(s, v):
            return left + (width - left - right) * s / x_max, top + (height - top - bottom) * (hi - v) / (hi - lo)

        for i in range(6):  # axes and ticks
            v = lo + (hi - lo) * i / 5
            _, y = xy(0, v)
            draw.line([(left, y), (width - right, y)], fill=(230, 230, 230))
            draw.text((5, y - 7), f"{10**v:.3g}", fill="black", font=font)
            s = x_max * i / 5
            x, _ = xy(s, lo)
            draw.text((x - 15, height - bottom + 8), f"{int(s)}", fill="black", font=font)
        draw.rectangle([left, top, width - right, height - bottom], outline="black")
        draw.text((width // 2 - 20, height - 25), "step", fill="black", font=font)
        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(120, 160, 230), width=1)
        smooth = np.convolve(losses, np.ones(min(9, len(losses))) / min(9, len(losses)), mode="valid")
        offset = (len(losses) - len(smooth)) // 2
        if len(smooth) > 1:
            draw.line([xy(s, v) for s, v in zip(steps[offset:], smooth)], fill=(20, 40, 160), width=2)
    draw.text((5, top - 20), "loss (log)", fill="black", font=font)
    image.save(path)


def sample_grid(pipe, captions: list[str], seeds: list[int], path: str, guidance: float) -> None:
    from PIL import Image, ImageDraw

    images = generate(pipe, captions, seeds, guidance_scale=guidance)
    scale, label_w, pad = 2, 330, 4
    side = images.shape[1] * scale
    grid = Image.new("RGB", (label_w + len(seeds) * (side + pad), len(captions) * (side + pad)), (200, 200, 200))
    draw = ImageDraw.Draw(grid)
    font = _font(13)
    held_out = set(scenes.held_out_captions("test")) | set(scenes.held_out_captions("validation"))
    for r, caption in enumerate(captions):
        y = r * (side + pad)
        draw.rectangle([0, y, label_w - pad, y + side], fill="white")
        held = " (held out)" if caption in held_out else ""
        draw.multiline_text((6, y + 6), "\n".join(textwrap.wrap(caption + held, 38)), fill="black", font=font)
        for c in range(len(seeds)):
            tile = Image.fromarray(images[r * len(seeds) + c]).resize((side, side), Image.NEAREST)
            grid.paste(tile, (label_w + c * (side + pad), y))
    grid.save(path)


# -- the run ----------------------------------------------------------------------------------------


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc)
    deadline = t0 + args.minutes * 60 - args.reserve_seconds
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.report_dir, exist_ok=True)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dit_config, text_config = PRESETS[args.preset]()
    transformer = ReferenceDiT(dit_config).to(device)
    text_encoder = ReferenceTextEncoder(text_config).to(device)
    counts = {"transformer": parameter_count(transformer), "text_encoder": parameter_count(text_encoder)}
    counts["total"] = counts["transformer"] + counts["text_encoder"]
    print(f"device {device_name(device)}; parameters {counts}; batch {args.batch_size}", flush=True)

    # The tokenizer is saved first and read back the way the pipeline reads it, so training sees
    # exactly the ids inference will.
    from transformers import PreTrainedTokenizerFast

    scenes.save_tokenizer(os.path.join(args.out, "tokenizer"), text_config.max_length)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(args.out, "tokenizer"))

    trainer = Trainer(args, transformer, text_encoder, device)
    producer = BatchProducer(
        tokenizer, args.seed, args.batch_size, args.caption_dropout, text_config.max_length, pin=device.type == "cuda"
    )
    train_start = time.perf_counter()
    try:
        steps, rows, planned = run_training(args, trainer, producer, deadline, args.report_dir)
    finally:
        producer.stop()
    train_seconds = time.perf_counter() - train_start
    compiled = trainer.compiled
    print(f"trained {steps} steps in {train_seconds:.1f} s (compiled: {compiled})", flush=True)

    # Save the EMA weights as shipped, then evaluate exactly those (read back from disk).
    weights_dtype = getattr(torch, args.weights_dtype)
    save_pipeline(args.out, trainer.ema_transformer, trainer.ema_text_encoder, weights_dtype=weights_dtype)
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.backends.cuda.matmul.allow_tf32 = False  # evaluate in true fp32, as the CPU runs it
    eval_start = time.perf_counter()
    pipe = load_pipeline(args.out, device=device)
    guidance, shift, sweep = choose_defaults(pipe, args, args.smoke)
    set_checkpoint_defaults(args.out, guidance, shift)
    pipe = load_pipeline(args.out, device=device)

    test_captions = scenes.held_out_captions("test")
    seen = scenes.seen_captions(20, seed=args.seed + 7)
    seeds = list(range(args.eval_seeds))
    if args.smoke:
        test_captions, seen = test_captions[:4], seen[:4]
    results = {
        "test_heldout": accuracy(pipe, test_captions, seeds)[0],
        "test_heldout_quality_test_seeds": accuracy(pipe, test_captions, list(QUALITY_TEST_SEEDS))[0],
        "seen_layouts": accuracy(pipe, seen, seeds)[0],
        "test_heldout_without_cfg": accuracy(pipe, test_captions, seeds, guidance_scale=1.0)[0],
    }
    print(f"detector accuracy: {results}", flush=True)

    grid_captions = [scenes.DEMO_CAPTION, *test_captions[:4], *seen[:2], "a green triangle on a white background"]
    grid_seeds = list(range(2 if args.smoke else 6))
    sample_grid(pipe, grid_captions, grid_seeds, os.path.join(args.report_dir, "samples.png"), guidance)
    plot_loss(
        rows,
        os.path.join(args.report_dir, "loss_curve.png"),
        f"training loss (EMA-free, mean of {args.log_every} steps)",
    )
    eval_seconds = time.perf_counter() - eval_start

    command = " ".join(
        shlex.quote(a) for a in ["python", "scripts/train_demo_model.py", *(argv if argv is not None else sys.argv[1:])]
    )
    reproduce = [a for a in (argv if argv is not None else sys.argv[1:])]
    if args.steps is None:
        reproduce += ["--steps", str(steps), "--warmup", str(args.warmup)]
        if planned is not None and planned != steps:  # stopped by the clock before the planned end
            reproduce += ["--schedule-steps", str(planned)]
    info = {
        "command": command,
        "reproduce_command": " ".join(shlex.quote(a) for a in ["python", "scripts/train_demo_model.py", *reproduce]),
        "git_commit": git_commit(),
        "started_utc": started.isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seed": args.seed,
        "preset": args.preset,
        "parameters": counts,
        "transformer_config": dit_config.to_dict(),
        "text_encoder_config": text_config.to_dict(),
        "batch_size": args.batch_size,
        "steps": steps,
        "planned_steps": planned,
        "images_seen": steps * args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "ema": args.ema,
        "caption_dropout": args.caption_dropout,
        "compiled": compiled,
        "final_loss": rows[-1]["loss"] if rows else None,
        "seconds": {
            "training": round(train_seconds, 1),
            "evaluation": round(eval_seconds, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "weights_dtype": args.weights_dtype,
        "checkpoint_bytes": folder_bytes(args.out),
        "defaults": {"num_inference_steps": DEFAULT_NUM_INFERENCE_STEPS, "guidance_scale": guidance, "shift": shift},
        "validation_sweep": sweep,
        "detector_accuracy": results,
        "eval_seeds": args.eval_seeds,
        "held_out_test_captions": test_captions,
    }
    with open(os.path.join(args.report_dir, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    write_report(info, os.path.join(args.report_dir, "REPORT.md"))
    print(
        f"wrote {args.out} ({info['checkpoint_bytes'] / 1e6:.1f} MB) and {args.report_dir} "
        f"in {info['seconds']['total']:.0f} s",
        flush=True,
    )
    return 0


def write_report(info: dict, path: str) -> None:
    acc, seconds, params = info["detector_accuracy"], info["seconds"], info["parameters"]
    lines = [
        "# Demo model training run",
        "",
        f"- Command: `{info['command']}`",
        f"- Reproduce exactly: `{info['reproduce_command']}`",
        f"- Device: {info['device']} (torch {info['torch']}, CUDA {info['cuda']}), commit {info['git_commit']}",
        f"- Started {info['started_utc']}; training {seconds['training']} s, evaluation {seconds['evaluation']} s, "
        f"total {seconds['total']} s",
        f"- Parameters: {params['transformer']:,} (DiT) + {params['text_encoder']:,} (text encoder) "
        f"= {params['total']:,}; checkpoint {info['checkpoint_bytes'] / 1e6:.1f} MB ({info['weights_dtype']})",
        f"- {info['steps']} steps x batch {info['batch_size']} = {info['images_seen']:,} images; "
        f"final loss {info['final_loss']}",
        f"- Defaults chosen on held-out validation layouts: {info['defaults']}",
        "",
        "| detector accuracy | |",
        "|---|---|",
        f"| held-out test layouts, {info['eval_seeds']} seeds each | {acc['test_heldout']:.1%} |",
        f"| held-out test layouts, the quality test's seeds {list(QUALITY_TEST_SEEDS)} "
        f"| {acc['test_heldout_quality_test_seeds']:.1%} |",
        f"| held-out test layouts without CFG | {acc['test_heldout_without_cfg']:.1%} |",
        f"| layouts seen in training | {acc['seen_layouts']:.1%} |",
        "",
        "Validation sweep (guidance x shift):",
        "",
        "| guidance | shift | accuracy |",
        "|---|---|---|",
        *[
            f"| {r['guidance_scale']} | {r['shift']} | {r['validation_accuracy']:.1%} |"
            for r in info["validation_sweep"]
        ],
        "",
        "![loss](loss_curve.png)",
        "",
        "![samples](samples.png)",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
