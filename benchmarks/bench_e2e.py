#!/usr/bin/env python
"""Whole requests, diffserve vs diffusers, on the same checkpoint, in one process on one GPU.

For the model chosen (a row of MODELS) a checkpoint in the diffusers layout is written on first use
and reused after (`--ckpt`): the real transformer and VAE configurations with random bf16 weights
(the transformer's 1-D parameters perturbed, as bench_forward.py does), text encoders at the real
hidden width but `--text-encoder-layers` layers (default 2: the checkpoint stays small and quick to
write; by FLOP count the full-depth encoders would add well under 1% to a request), and tokenizers
built in memory (no hub; diffserve.testing.tokenizers), with vocabularies of a few hundred tokens.

Then diffusers' pipeline (from_pretrained, eager; `--diffusers-compile`: its transformer's repeated
blocks compiled) and diffserve's `Omni` (eager; `--compile`: diffserve's regional compile) are loaded
side by side and given the same request: prompt, negative prompt and input image where the model
has them, seed (one CPU generator, which diffserve reproduces), size, steps and guidance. Each side
gets a warm-up request (`--warmup-steps`, same shapes: compilation and autotuning happen there), then
`--repeats` timed requests, alternating. Reported per side (medians): the request time, from the call
to the pixels on the host; its stages (diffserve: DiffusionOutput.metrics; diffusers: CUDA events
recorded from hooks on its components, see StageProbe); peak GPU memory allocated by PyTorch, which
counts both pipelines' weights as both live in the process, so each side's weights and its request's
peak above what was allocated before are given too; and the PSNR of diffserve's image against
diffusers' (the last timed pair) on the [0, 1] pixels, with how many of diffusers' pixels are
clamped at 0 or 1, and on the final latents (what each VAE's decode was given), since a random VAE
that saturates its pixels would hide differences.

GPU (one H200, bf16). The checkpoints take 25 GB (FLUX) and 42 GB (Qwen-Image-Edit): the lent
machine's 64 GB disk holds one at a time. Qwen-Image-Edit runs 20 of its 50 default steps here to
stay within a few minutes (its denoise stage scales with the steps):

    python benchmarks/bench_e2e.py --model flux --ckpt /tmp/e2e-flux --json-out flux_e2e.json
    # the same with diffserve's speed options (docs/speed.md), against diffusers compiled
    python benchmarks/bench_e2e.py --model flux --ckpt /tmp/e2e-flux --compile --diffusers-compile \
        --engine cuda_graphs=true --engine quantization=fp8 --engine attention_backend=cudnn_fp8
    rm -rf /tmp/e2e-flux
    python benchmarks/bench_e2e.py --model qwen-image-edit --ckpt /tmp/e2e-qwen-edit --steps 20 --repeats 2 \\
        --json-out qwen_image_edit_e2e.json

CPU smoke test (diffserve.testing's tiny checkpoints, fp32, 2 steps, seconds):

    python benchmarks/bench_e2e.py --model flux --tiny
    python benchmarks/bench_e2e.py --model qwen-image-edit --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from bench_flux_transformer import CONFIGS as FLUX_CONFIGS, default_dtype
from forward_timing import device_name

# Marks a finished checkpoint folder (written last) and what it was built with.
MARKER = "bench_e2e.json"

# -- real configurations (random weights) ---------------------------------------------------------

# black-forest-labs/FLUX.1-dev: vae/, text_encoder/ (CLIP ViT-L/14), text_encoder_2/ (T5 v1.1 XXL),
# scheduler/ configs.
FLUX_DEV_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
                   hidden_act="quick_gelu")
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                          use_dynamic_shifting=True)

# Qwen/Qwen-Image-Edit: transformer/, vae/ (the released defaults of AutoencoderKLQwenImage, stated
# here), text_encoder/ (Qwen2.5-VL-7B) and processor/ configs.
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))
QWEN25VL_7B_TEXT = dict(
    hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=128000,
    rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
)
QWEN25VL_7B_VISION = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          window_size=112)
QWEN_PROCESSOR_PIXELS = dict(min_pixels=56 * 56, max_pixels=12845056)


def perturb_1d_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Norm weights start at exactly 1 and biases at 0; perturbed, every parameter is distinct (as
    in bench_forward.py), so the random model is not special in ways a real one is not."""
    gen = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * scale)
    return module


def save_checkpoint(pipe, path: str) -> None:
    """save_pretrained, refused before a minute of writing when the folder's disk cannot hold it."""
    needed = weights_gib(pipeline_modules(pipe)) + 1.0
    os.makedirs(path, exist_ok=True)
    free = shutil.disk_usage(path).free / 2**30
    if free < needed:
        sys.exit(f"--ckpt {path}: the checkpoint needs about {needed:.0f} GiB and that disk has {free:.0f} GiB free; "
                 "pass a --ckpt on a larger disk (/dev/shm holds it in memory)")
    pipe.save_pretrained(path, safe_serialization=True)


def build_flux(path: str, layers: int, device: torch.device) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from diffserve.testing.components import tiny_clip_text_model, tiny_t5_encoder
    from diffserve.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    with torch.device(device), default_dtype(torch.bfloat16):  # 12B parameters never exist in fp32
        pipe = FluxPipeline(
            scheduler=scheduler,
            vae=AutoencoderKL(**FLUX_DEV_VAE).eval(),
            text_encoder=tiny_clip_text_model(clip_tokenizer, **CLIP_L_TEXT, num_hidden_layers=layers),
            tokenizer=clip_tokenizer,
            text_encoder_2=tiny_t5_encoder(t5_tokenizer, **T5_XXL, num_layers=layers),
            tokenizer_2=t5_tokenizer,
            transformer=perturb_1d_(FluxTransformer2DModel(**FLUX_CONFIGS["dev"]), seed=1).eval(),
        )
    save_checkpoint(pipe, path)


def build_qwen_image_edit(path: str, layers: int, device: torch.device) -> None:
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageTransformer2DModel)

    from diffserve.testing.qwen_image import (LATENTS_MEAN, LATENTS_STD, QWEN_IMAGE_SCHEDULER, build_qwen2_tokenizer,
                                              build_qwen2vl_processor, build_qwen25vl_text_encoder,
                                              complete_processor_folder)

    tokenizer, scheduler = build_qwen2_tokenizer(), FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    # The released tower has full attention in every 8th of its 32 blocks; here in the last one.
    vision = QWEN25VL_7B_VISION | dict(depth=layers, fullatt_block_indexes=[layers - 1])
    with torch.device(device), default_dtype(torch.bfloat16):  # 20B parameters never exist in fp32
        pipe = QwenImageEditPipeline(
            scheduler=scheduler,
            vae=AutoencoderKLQwenImage(
                base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD,
            ).eval(),
            text_encoder=build_qwen25vl_text_encoder(
                tokenizer, text=QWEN25VL_7B_TEXT | dict(num_hidden_layers=layers), vision=vision
            ),
            tokenizer=tokenizer,
            processor=build_qwen2vl_processor(tokenizer, **QWEN_PROCESSOR_PIXELS),
            transformer=perturb_1d_(QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER), seed=1).eval(),
        )
    save_checkpoint(pipe, path)
    complete_processor_folder(path, **QWEN_PROCESSOR_PIXELS)


@dataclass(frozen=True)
class Model:
    """One row of MODELS. `sampling` goes as is to both sides (OmniDiffusionSamplingParams and the
    diffusers call take the same names)."""

    title: str
    build: Callable[[str, int, torch.device], None]  # (folder, text-encoder layers, device)
    tiny: str  # diffserve.testing architecture for --tiny
    prompt: str
    steps: int
    sampling: dict = field(default_factory=dict)
    negative_prompt: str | None = None
    input_image: bool = False  # one input image of the output's size
    size: int = 1024
    tiny_size: int = 32


MODELS = {
    "flux": Model(
        "FLUX.1-dev", build_flux, tiny="flux", prompt="a red fox in the snow, detailed fur, golden hour",
        steps=28, sampling=dict(guidance_scale=3.5, max_sequence_length=512),
    ),
    "qwen-image-edit": Model(
        "Qwen-Image-Edit", build_qwen_image_edit, tiny="qwen-image-edit",
        prompt="make the sky purple and add a small red boat", negative_prompt="blurry, low quality, distorted",
        steps=50, sampling=dict(true_cfg_scale=4.0), input_image=True,
        # The tiny edit checkpoint's VAE downsamples 16x: sizes are multiples of 32.
        tiny_size=64,
    ),
}


def ensure_checkpoint(args, model: Model, device: torch.device) -> str:
    """The checkpoint folder: reused when this script finished writing it with the same settings."""
    layers = None if args.tiny else args.text_encoder_layers
    wanted = {"model": args.model, "tiny": args.tiny, "text_encoder_layers": layers}
    path = args.ckpt or f"/tmp/e2e-{args.model}"
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            found = json.load(f)
        if found != wanted:
            sys.exit(f"--ckpt {path} holds a checkpoint built with {found}, not {wanted}: remove it or pass "
                     "another --ckpt")
        return path
    if os.path.exists(os.path.join(path, "model_index.json")):
        sys.exit(f"--ckpt {path} holds a checkpoint this script did not finish writing (no {MARKER}): remove it "
                 "or pass another --ckpt")
    start = time.perf_counter()
    if args.tiny:
        from diffserve.testing import make_tiny_checkpoint

        make_tiny_checkpoint(model.tiny, path)
    else:
        model.build(path, args.text_encoder_layers, device)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    with open(marker, "w") as f:
        json.dump(wanted, f)
    print(f"wrote checkpoint to {path} in {time.perf_counter() - start:.1f} s", flush=True)
    return path


# -- the two sides ----------------------------------------------------------------------------------


class Timeline:
    """Points in time on the device: CUDA events (recorded without synchronising, so the hooks do not
    change what they measure), or perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


class StageProbe:
    """Stage times of a diffusers pipeline call, from forward pre/post hooks on its text encoders and
    transformer and wrappers around its VAE's encode and decode. The spans follow diffserve's stages:
    encode = the call's start to the first transformer forward (prompts, input-image latents, noise),
    denoise = the first transformer forward's start to the last one's end, decode = from there to the
    call's end (VAE decode, post-processing). Also each component's own total time (the text
    encoders together)."""

    def __init__(self, pipe, timeline: Timeline):
        self.timeline = timeline
        self.spans: dict[str, list] = {}
        self.open: dict[str, object] = {}
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and (name == "transformer" or name.startswith("text_encoder")):
                key = "transformer" if name == "transformer" else "text_encoder"
                component.register_forward_pre_hook(lambda *_, key=key: self._enter(key))
                component.register_forward_hook(lambda *_, key=key: self._leave(key))
        for method in ("encode", "decode"):
            setattr(pipe.vae, method, self._timed(f"vae_{method}", getattr(pipe.vae, method)))

    def _enter(self, key: str) -> None:
        self.open[key] = self.timeline.mark()

    def _leave(self, key: str) -> None:
        self.spans.setdefault(key, []).append((self.open.pop(key), self.timeline.mark()))

    def _timed(self, key: str, method):
        def timed(*args, **kwargs):
            self._enter(key)
            try:
                return method(*args, **kwargs)
            finally:
                self._leave(key)

        return timed

    def start(self) -> None:
        self.spans, self.open = {}, {}
        self.begin = self.timeline.mark()

    def stop(self) -> dict[str, float]:
        end = self.timeline.mark()
        torch.cuda.synchronize() if self.timeline.cuda else None
        seconds = self.timeline.seconds
        first, last = self.spans["transformer"][0][0], self.spans["transformer"][-1][1]
        stages = {"encode_s": seconds(self.begin, first), "denoise_s": seconds(first, last),
                  "decode_s": seconds(last, end), "call_s": seconds(self.begin, end)}
        for key, spans in self.spans.items():
            stages[f"{key}_s"] = sum(seconds(a, b) for a, b in spans)
        return stages


class LatentTap:
    """Keeps the latents a VAE's decode was last given: the two sides' final latents are compared too,
    as a random VAE that saturates its pixels would hide differences."""

    def __init__(self, vae):
        self.latents = None
        decode = vae.decode

        def tapped(*args, **kwargs):
            self.latents = args[0] if args else kwargs["z"]
            return decode(*args, **kwargs)

        vae.decode = tapped


@dataclass
class Request:
    prompt: str
    negative_prompt: str | None
    image: object | None
    height: int
    width: int
    sampling: dict
    seed: int


def sync(device: torch.device) -> None:
    torch.cuda.synchronize(device) if device.type == "cuda" else None


def diffserve_call(omni, req: Request, steps: int, device: torch.device):
    """(seconds, [0, 1] pixels on the host, stage seconds)."""
    from diffserve import OmniDiffusionSamplingParams

    prompt = {"prompt": req.prompt, "seed": req.seed}
    prompt |= {"negative_prompt": req.negative_prompt} if req.negative_prompt is not None else {}
    prompt |= {"image": req.image} if req.image is not None else {}
    params = OmniDiffusionSamplingParams(height=req.height, width=req.width, num_inference_steps=steps,
                                         output_type="pt", **req.sampling)
    sync(device)
    start = time.perf_counter()
    out = omni.generate(prompt, params)[0]
    seconds = time.perf_counter() - start
    return seconds, out.images.float(), {k: v for k, v in out.metrics.items() if k.endswith("_s")}


def diffusers_call(pipe, probe: StageProbe, req: Request, steps: int, device: torch.device):
    """(seconds, [0, 1] pixels on the host, stage seconds)."""
    extra = {"negative_prompt": req.negative_prompt} if req.negative_prompt is not None else {}
    extra |= {"image": req.image} if req.image is not None else {}
    sync(device)
    start = time.perf_counter()
    probe.start()
    with torch.inference_mode():
        images = pipe(prompt=req.prompt, height=req.height, width=req.width, num_inference_steps=steps,
                      generator=torch.Generator("cpu").manual_seed(req.seed), output_type="pt",
                      **req.sampling, **extra).images
    stages = probe.stop()
    images = images.float().cpu()
    return time.perf_counter() - start, images, stages


def load_diffusers(path: str, device: torch.device, dtype: torch.dtype, compile_blocks: bool):
    import diffusers

    from diffserve.models.qwen_image.processor import load_qwen2vl_processor
    from diffserve.registry import read_model_index

    class_name = read_model_index(path)["_class_name"]
    components = {}
    if os.path.isdir(os.path.join(path, "processor")):
        # Qwen2-VL's processor: loadable without torchvision only this way (diffserve.models.qwen_image).
        components["processor"] = load_qwen2vl_processor(os.path.join(path, "processor"))
    pipe = getattr(diffusers, class_name).from_pretrained(path, dtype=dtype, **components).to(device)
    pipe.set_progress_bar_config(disable=True)
    if compile_blocks:
        pipe.transformer.compile_repeated_blocks()
    return pipe


def pipeline_modules(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def weights_gib(modules) -> float:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers())) / 2**30


@dataclass
class Side:
    """One side's timed requests."""

    weights_gib: float
    load_s: float
    request_s: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    peak_gib: float | None = None
    request_peak_gib: float | None = None  # the peak above what was allocated when the request began

    def measure(self, call, device: torch.device):
        """Run call() -> (seconds, images, stages); record its time, stages and memory; return the images."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        seconds, images, stages = call()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            self.peak_gib = max(self.peak_gib or 0.0, peak / 2**30)
            self.request_peak_gib = max(self.request_peak_gib or 0.0, (peak - before) / 2**30)
        self.request_s.append(seconds)
        for key, value in stages.items():
            self.stages.setdefault(key, []).append(value)
        return images

    def summary(self) -> dict:
        return {"request_s": statistics.median(self.request_s), "request_s_all": self.request_s,
                "stages_s": {k: statistics.median(v) for k, v in self.stages.items()},
                "load_s": self.load_s, "weights_gib": self.weights_gib, "peak_gib": self.peak_gib,
                "request_peak_above_start_gib": self.request_peak_gib}


def pixel_stats(images: torch.Tensor) -> dict:
    """A random-weight VAE may clamp most pixels to 0 or 1, which hides differences: the PSNR means
    something only when few pixels are saturated and the image varies."""
    return {"mean": images.mean().item(), "std": images.std().item(),
            "saturated_fraction": ((images <= 0) | (images >= 1)).float().mean().item()}


def agreement(ours: torch.Tensor, reference: torch.Tensor, peak: float | None = None) -> dict:
    """PSNR against `peak` (default: the reference's largest magnitude), relative L2 error and max-abs
    difference."""
    ours, reference = ours.float().cpu(), reference.float().cpu()
    mse = (ours - reference).pow(2).mean().item()
    peak = reference.abs().max().item() if peak is None else peak
    return {"psnr_db": float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item(),
            "rel_err": ((ours - reference).norm() / reference.norm()).item(),
            "max_abs_diff": (ours - reference).abs().max().item()}


def seconds_of(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(args, model: Model, path: str, device: torch.device, dtype: torch.dtype) -> dict:
    from diffserve import Omni
    from diffserve.testing.conformance import sample_image

    size = model.tiny_size if args.tiny else model.size
    req = Request(model.prompt, model.negative_prompt, sample_image(size, size, 0) if model.input_image else None,
                  size, size, model.sampling, args.seed)
    start = time.perf_counter()
    pipe = load_diffusers(path, device, dtype, args.diffusers_compile)
    theirs = Side(weights_gib(pipeline_modules(pipe)), time.perf_counter() - start)
    their_latents = LatentTap(pipe.vae)
    probe = StageProbe(pipe, Timeline(device))
    start = time.perf_counter()
    with Omni(path, dtype=args.dtype, device=args.device, enforce_eager=not args.compile,
              disable_progress_bar=True, **args.engine) as omni:
        ours = Side(weights_gib([omni.engine.executor.worker.pipeline]), time.perf_counter() - start)
        our_latents = LatentTap(omni.engine.executor.worker.pipeline.vae)
        print(f"loaded: diffusers {theirs.load_s:.1f} s, diffserve {ours.load_s:.1f} s", flush=True)
        warmup_s = {"diffusers": seconds_of(lambda: diffusers_call(pipe, probe, req, args.warmup_steps, device)),
                    "diffserve": seconds_of(lambda: diffserve_call(omni, req, args.warmup_steps, device))}
        print(f"warm-up ({args.warmup_steps} steps): diffusers {warmup_s['diffusers']:.1f} s, diffserve "
              f"{warmup_s['diffserve']:.1f} s", flush=True)
        for i in range(args.repeats):
            reference = theirs.measure(lambda: diffusers_call(pipe, probe, req, args.steps, device), device)
            image = ours.measure(lambda: diffserve_call(omni, req, args.steps, device), device)
            print(f"request {i + 1}/{args.repeats}: diffusers {theirs.request_s[-1]:.2f} s, diffserve "
                  f"{ours.request_s[-1]:.2f} s", flush=True)
    return {
        "model": args.model, "title": model.title, "checkpoint": path, "tiny": args.tiny,
        "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
        "text_encoder_layers": None if args.tiny else args.text_encoder_layers,
        "dtype": args.dtype, "height": req.height, "width": req.width, "steps": args.steps,
        "warmup_steps": args.warmup_steps, "repeats": args.repeats, "seed": args.seed,
        "prompt": req.prompt, "negative_prompt": req.negative_prompt,
        "input_image": f"{size}x{size}" if req.image is not None else None, "sampling": req.sampling,
        "compiled": {"diffusers": args.diffusers_compile, "diffserve": args.compile}, "warmup_s": warmup_s,
        "diffusers": theirs.summary(), "diffserve": ours.summary(),
        "speedup": statistics.median(theirs.request_s) / statistics.median(ours.request_s),
        "pixels": agreement(image, reference, peak=1.0), "diffusers_image_stats": pixel_stats(reference),
        "latents": agreement(our_latents.latents, their_latents.latents),
        "outputs_finite": bool(torch.isfinite(image).all() and torch.isfinite(reference).all()),
    }


# -- report -------------------------------------------------------------------------------------------


def count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def report(result: dict) -> None:
    layers = (f"text encoders at the real width, {result['text_encoder_layers']} layers" if not result["tiny"]
              else "diffserve.testing's tiny checkpoint")
    sampling = ", ".join(f"{k} {v}" for k, v in result["sampling"].items())
    image = f", input image {result['input_image']}" if result["input_image"] else ""
    print(f"\n{result['title']} ({count(result['transformer_params'])} transformer, random {result['dtype']} "
          f"weights; {layers}): {result['height']}x{result['width']}{image}, {result['steps']} steps, {sampling}"
          f"{', negative prompt' if result['negative_prompt'] else ''}; {result['device']}, torch {result['torch']}, "
          f"diffusers {result['diffusers_version']}; median of {result['repeats']}")
    print(f"{'':<22}{'request s':>10}{'encode s':>10}{'denoise s':>10}{'decode s':>10}{'peak GiB':>10}"
          f"{'weights GiB':>12}")
    for name in ("diffusers", "diffserve"):
        side = result[name]
        label = f"{name} ({'compiled' if result['compiled'][name] else 'eager'})"
        stages = "".join(f"{side['stages_s'][k]:>10.3f}" for k in ("encode_s", "denoise_s", "decode_s"))
        peak = f"{side['peak_gib']:>10.1f}" if side["peak_gib"] is not None else f"{'-':>10}"
        print(f"{label:<22}{side['request_s']:>10.3f}{stages}{peak}{side['weights_gib']:>12.1f}")
    pixels, latents, stats = result["pixels"], result["latents"], result["diffusers_image_stats"]
    print(f"diffusers / diffserve request time: {result['speedup']:.3f}x")
    print(f"diffserve vs diffusers: image PSNR {pixels['psnr_db']:.1f} dB, max abs {pixels['max_abs_diff']:.3g} "
          f"(diffusers' image: std {stats['std']:.3f}, {stats['saturated_fraction']:.1%} of the values at 0 or 1); "
          f"final latents PSNR {latents['psnr_db']:.1f} dB, rel L2 {latents['rel_err']:.2e}"
          f"{'' if result['outputs_finite'] else ' (NON-FINITE OUTPUT)'}", flush=True)


def _engine_option(parser: argparse.ArgumentParser, item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        parser.error(f"--engine takes KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string, such as fp8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--ckpt", default=None, metavar="DIR",
                   help="checkpoint folder, written if absent (default /tmp/e2e-MODEL; --tiny: a temporary one)")
    p.add_argument("--tiny", action="store_true", help="diffserve.testing's tiny checkpoint, fp32, 2 steps, small size")
    p.add_argument("--text-encoder-layers", type=int, default=2,
                   help="layers of each text encoder, and of Qwen2.5-VL's vision tower (default 2)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default: {', '.join(f'{k} {m.steps}' for k, m in MODELS.items())}; "
                        "--tiny: 2)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up request of each side")
    p.add_argument("--repeats", type=int, default=3, help="timed requests of each side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="diffserve compiles its transformer's blocks")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="a diffserve engine option, the value as JSON where it parses (repeatable), e.g. "
                        "--engine cuda_graphs=true --engine quantization=fp8 --engine attention_backend=cudnn_fp8")
    p.add_argument("--diffusers-compile", action="store_true",
                   help="diffusers compiles its transformer's blocks (compile_repeated_blocks)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="the real configurations need a GPU (pick one with CUDA_VISIBLE_DEVICES); cpu is for --tiny")
    p.add_argument("--json-out", default=None, metavar="PATH")
    args = p.parse_args(argv)
    args.engine = dict(_engine_option(p, item) for item in args.engine)
    if args.text_encoder_layers < 1 or args.repeats < 1 or args.warmup_steps < 1 or (args.steps or 1) < 1:
        p.error("--text-encoder-layers, --steps, --warmup-steps and --repeats must be at least 1")
    model, device = MODELS[args.model], torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: torch {torch.__version__} sees no GPU (use --device cpu with --tiny)")
    args.dtype = "float32" if args.tiny else "bfloat16"
    args.steps = args.steps or (2 if args.tiny else model.steps)

    import diffusers

    with tempfile.TemporaryDirectory(prefix=f"e2e-tiny-{args.model}-") as tiny_folder:
        if args.tiny and args.ckpt is None:
            args.ckpt = tiny_folder
        path = ensure_checkpoint(args, model, device)
        result = run(args, model, path, device, getattr(torch, args.dtype))
    result.update(engine_options=args.engine, device=device_name(device), torch=torch.__version__,
                  diffusers_version=diffusers.__version__,
                  date=time.strftime("%Y-%m-%d"), command=" ".join([os.path.basename(sys.executable), *sys.argv]))
    report(result)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["outputs_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
