#!/usr/bin/env python
"""Whole requests, diffserve vs diffusers, on the same checkpoint, in one process on one GPU.

Rows (MODELS): FLUX.1-dev 1024x1024 28 steps; Qwen-Image 1024x1024 50 steps and Qwen-Image-Edit (a
1024x1024 input image), both true CFG 4.0 with a negative prompt; Stable Diffusion 3.5 Large 1024x1024
28 steps, guidance 3.5; Wan2.1 T2V 1.3B and 14B, 480x832, 81 frames, 50 steps, guidance 5.0 with a
negative prompt; Stable Audio Open 1.0, 10 s of audio, 100 steps, guidance 7.0 with a negative prompt.

For the model chosen a checkpoint in the diffusers layout is written on first use and reused after
(`--ckpt`): the real transformer and VAE configurations with random bf16 weights (the transformer's
1-D parameters perturbed, as bench_forward.py does), text encoders at the real hidden width but
`--text-encoder-layers` layers (default 2: the checkpoint stays small and quick to write; by FLOP
count the full-depth encoders would add well under 1% to a request), and tokenizers built in memory
(no hub; diffserve.testing.tokenizers), with vocabularies of a few hundred tokens.

Then diffusers' pipeline (from_pretrained, eager; `--diffusers-compile`: its transformer's repeated
blocks compiled) and diffserve's `Omni` (eager; `--compile`: diffserve's regional compile) are loaded
side by side and given the same request: prompt, negative prompt and input image where the model
has them, seed (one CPU generator, which diffserve reproduces), shape (height and width, frames, audio
seconds), steps and guidance. Each side gets a warm-up request (`--warmup-steps`, same shapes:
compilation and autotuning happen there), then `--repeats` timed requests, alternating. Reported per
side (medians): the request time, from the call to the output on the host; its stages (diffserve:
DiffusionOutput.metrics; diffusers: CUDA events recorded from hooks on its components, see
StageProbe); peak GPU memory allocated by PyTorch, which counts both pipelines' weights as both live
in the process, so each side's weights and its request's peak above what was allocated before are
given too; and the PSNR of diffserve's output (image, video frames or waveform) against diffusers'
(the last timed pair): images and videos on their [0, 1] values, with how many of diffusers' values
are clamped at 0 or 1, audio against the reference's largest magnitude; and on the final latents
(what each VAE's decode was given), since a random VAE that saturates its pixels would hide
differences.

GPU (one H200, bf16). The checkpoints (bf16 weights, text encoders at 2 layers) take 24.8 GB (FLUX),
42.2 GB (Qwen-Image, Qwen-Image-Edit), 17.5 GB (SD3.5 Large), 3.9 GB (Wan2.1 1.3B), 29.6 GB (Wan2.1
14B: a 28.6 GB transformer) and 2.5 GB (Stable Audio): the lent machine's 64 GB disk holds one at a
time (rm -rf each after its run). Steps are lowered where the denoise stage (which scales with them)
would keep a run past a few minutes; Stable Audio's scheduler needs torchsde:

    python benchmarks/bench_e2e.py --model flux --ckpt /tmp/e2e-flux --json-out flux_e2e.json
    # the same with diffserve's speed options (docs/speed.md), against diffusers compiled
    python benchmarks/bench_e2e.py --model flux --ckpt /tmp/e2e-flux --compile --diffusers-compile \\
        --engine cuda_graphs=true --engine quantization=fp8 --engine attention_backend=cudnn_fp8
    python benchmarks/bench_e2e.py --model qwen-image-edit --ckpt /tmp/e2e-qwen-edit --steps 20 --repeats 2 \\
        --json-out qwen_image_edit_e2e.json
    python benchmarks/bench_e2e.py --model qwen-image --ckpt /tmp/e2e-qwen-image --steps 20 --repeats 2 \\
        --json-out qwen_image_e2e.json
    python benchmarks/bench_e2e.py --model sd3.5-large --ckpt /tmp/e2e-sd35 --json-out sd35_large_e2e.json
    python benchmarks/bench_e2e.py --model wan2.1-1.3b --ckpt /tmp/e2e-wan13 --steps 10 --repeats 2 \\
        --json-out wan21_1.3b_e2e.json
    python benchmarks/bench_e2e.py --model wan2.1-14b --ckpt /tmp/e2e-wan14 --steps 4 --repeats 2 --warmup-steps 1 \\
        --json-out wan21_14b_e2e.json
    python benchmarks/bench_e2e.py --model stable-audio --ckpt /tmp/e2e-audio --json-out stable_audio_e2e.json

CPU smoke test (diffserve.testing's tiny checkpoints, fp32, 2 steps, small shapes, seconds), any row:

    python benchmarks/bench_e2e.py --model wan2.1-1.3b --tiny
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
from bench_wan_transformer import CONFIGS as WAN_CONFIGS
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

# stabilityai/stable-diffusion-3.5-large: transformer/, vae/ (FLUX.1-dev's VAE shape with SD3's
# latent scaling), text_encoder/ (CLIP ViT-L/14), text_encoder_2/ (OpenCLIP bigG) and scheduler/.
SD35_LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                              num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                              qk_norm="rms_norm")
SD3_VAE = FLUX_DEV_VAE | dict(scaling_factor=1.5305, shift_factor=0.0609)
# bigG's activation is stated from OpenCLIP ViT-bigG-14 (gelu), not read from the released config.
CLIP_G_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280,
                   hidden_act="gelu")
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# stabilityai/stable-audio-open-1.0: transformer/ (StableAudioDiTModel's defaults, stated here), vae/
# (AutoencoderOobleck's defaults are the released ones), text_encoder/ (T5-base) and projection_model/.
STABLE_AUDIO_DIT = dict(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                        num_key_value_attention_heads=12, out_channels=64, cross_attention_dim=768, time_proj_dim=256,
                        global_states_input_dim=1536, cross_attention_input_dim=768)
# T5-base's feed-forward is the original T5's ReLU one (not v1.1's gated-gelu).
T5_BASE = dict(d_model=768, d_kv=64, d_ff=3072, num_heads=12, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, feed_forward_proj="relu", layer_norm_epsilon=1e-6)
# Stable Audio pads prompts to 128 tokens (its T5 conditioner's max_length; not read from the released
# tokenizer config).
STABLE_AUDIO_PROMPT_TOKENS = 128


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


def build_qwen_image(path: str, layers: int, device: torch.device, edit: bool = False) -> None:
    """Qwen-Image (text-to-image) or, with `edit`, Qwen-Image-Edit: the same transformer, VAE and
    text encoder; the edit pipeline adds Qwen2-VL's processor for its input image."""
    import diffusers
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from diffserve.testing.qwen_image import (LATENTS_MEAN, LATENTS_STD, QWEN_IMAGE_SCHEDULER, build_qwen2_tokenizer,
                                              build_qwen2vl_processor, build_qwen25vl_text_encoder,
                                              complete_processor_folder)

    tokenizer, scheduler = build_qwen2_tokenizer(), FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    # The released tower has full attention in every 8th of its 32 blocks; here in the last one.
    vision = QWEN25VL_7B_VISION | dict(depth=layers, fullatt_block_indexes=[layers - 1])
    processor = dict(processor=build_qwen2vl_processor(tokenizer, **QWEN_PROCESSOR_PIXELS)) if edit else {}
    pipeline_class = diffusers.QwenImageEditPipeline if edit else diffusers.QwenImagePipeline
    with torch.device(device), default_dtype(torch.bfloat16):  # 20B parameters never exist in fp32
        pipe = pipeline_class(
            scheduler=scheduler,
            vae=AutoencoderKLQwenImage(
                base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD,
            ).eval(),
            text_encoder=build_qwen25vl_text_encoder(
                tokenizer, text=QWEN25VL_7B_TEXT | dict(num_hidden_layers=layers), vision=vision
            ),
            tokenizer=tokenizer,
            transformer=perturb_1d_(QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER), seed=1).eval(),
            **processor,
        )
    save_checkpoint(pipe, path)
    if edit:
        complete_processor_folder(path, **QWEN_PROCESSOR_PIXELS)


def build_wan(config: str, path: str, layers: int, device: torch.device) -> None:
    """Wan2.1 T2V of bench_wan_transformer's `config` ("1.3b", "14b"), UMT5-XXL-wide text encoder."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffserve.testing.components import tiny_t5_encoder
    from diffserve.testing.tokenizers import build_t5_tokenizer
    from diffserve.testing.wan import wan_scheduler  # UniPC, as the released checkpoints ship

    # Schedulers are built outside the device context: theirs keep their tables on the CPU.
    tokenizer, scheduler = build_t5_tokenizer(), wan_scheduler(flow_shift=3.0)
    with torch.device(device), default_dtype(torch.bfloat16):
        pipe = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=tiny_t5_encoder(tokenizer, UMT5EncoderModel, UMT5Config, **T5_XXL, num_layers=layers),
            vae=AutoencoderKLWan().eval(),  # its defaults are Wan2.1's released VAE
            scheduler=scheduler,
            transformer=perturb_1d_(WanTransformer3DModel(**WAN_CONFIGS[config]), seed=1).eval(),
        )
    save_checkpoint(pipe, path)


def build_sd35_large(path: str, layers: int, device: torch.device) -> None:
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    from diffserve.testing.components import tiny_clip_text_model, tiny_t5_encoder
    from diffserve.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    with torch.device(device), default_dtype(torch.bfloat16):
        pipe = StableDiffusion3Pipeline(
            transformer=perturb_1d_(SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER), seed=1).eval(),
            scheduler=scheduler,
            vae=AutoencoderKL(**SD3_VAE).eval(),
            text_encoder=tiny_clip_text_model(clip_tokenizer, CLIPTextModelWithProjection, **CLIP_L_TEXT,
                                              num_hidden_layers=layers),
            tokenizer=clip_tokenizer,
            text_encoder_2=tiny_clip_text_model(clip_tokenizer, CLIPTextModelWithProjection, **CLIP_G_TEXT,
                                                num_hidden_layers=layers),
            tokenizer_2=clip_tokenizer,
            text_encoder_3=tiny_t5_encoder(t5_tokenizer, **T5_XXL, num_layers=layers),
            tokenizer_3=t5_tokenizer,
        )
    save_checkpoint(pipe, path)


def build_stable_audio(path: str, layers: int, device: torch.device) -> None:
    # The scheduler's SDE noise needs torchsde.
    from diffusers import (AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel,
                           StableAudioPipeline, StableAudioProjectionModel)

    from diffserve.testing.components import tiny_t5_encoder
    from diffserve.testing.stable_audio import SCHEDULER_CONFIG, SECONDS_RANGE
    from diffserve.testing.tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(max_length=STABLE_AUDIO_PROMPT_TOKENS)
    scheduler, width = CosineDPMSolverMultistepScheduler(**SCHEDULER_CONFIG), T5_BASE["d_model"]
    with torch.device(device), default_dtype(torch.bfloat16):
        pipe = StableAudioPipeline(
            vae=AutoencoderOobleck().eval(),
            text_encoder=tiny_t5_encoder(tokenizer, **T5_BASE, num_layers=layers),
            projection_model=StableAudioProjectionModel(
                text_encoder_dim=width, conditioning_dim=width, min_value=SECONDS_RANGE[0], max_value=SECONDS_RANGE[1]
            ).eval(),
            tokenizer=tokenizer,
            transformer=perturb_1d_(StableAudioDiTModel(**STABLE_AUDIO_DIT), seed=1).eval(),
            scheduler=scheduler,
        )
    save_checkpoint(pipe, path)


# What each output kind is called on each side (output_type "pt") and the peak its PSNR is against:
# images and videos are [0, 1] (diffserve [N, C, H, W] and [N, F, C, H, W], as diffusers gives them);
# audio is a waveform [N, channels, samples] without a fixed range, so its peak is the reference's
# largest magnitude.
OUTPUTS = {
    "image": dict(diffserve="images", diffusers="images", peak=1.0),
    "video": dict(diffserve="frames", diffusers="frames", peak=1.0),
    "audio": dict(diffserve="audio", diffusers="audios", peak=None),
}
IMAGE_1024 = dict(height=1024, width=1024)
TINY_IMAGE = dict(height=32, width=32)
WAN_480P = dict(height=480, width=832, num_frames=81)
# diffserve.testing's tiny Wan VAE compresses 8x in space and 4x in time (+1 frame).
TINY_VIDEO = dict(height=32, width=32, num_frames=5)


@dataclass(frozen=True)
class Model:
    """One row of MODELS. `shape` (the request's height/width, num_frames or audio seconds) and
    `sampling` go as they are to both sides (OmniDiffusionSamplingParams and the diffusers call take
    the same names)."""

    title: str
    build: Callable[[str, int, torch.device], None]  # (folder, text-encoder layers, device)
    tiny: str  # diffserve.testing architecture for --tiny
    prompt: str
    steps: int
    sampling: dict = field(default_factory=dict)
    negative_prompt: str | None = None
    input_image: bool = False  # one input image of the output's size
    kind: str = "image"  # a key of OUTPUTS
    shape: dict = field(default_factory=lambda: IMAGE_1024)
    tiny_shape: dict = field(default_factory=lambda: TINY_IMAGE)


def _build(builder, *bound, **options) -> Callable[[str, int, torch.device], None]:
    """`builder` with its leading arguments (a config name) and options bound: a Model.build."""
    return lambda path, layers, device: builder(*bound, path, layers, device, **options)


MODELS = {
    "flux": Model(
        "FLUX.1-dev", build_flux, tiny="flux", prompt="a red fox in the snow, detailed fur, golden hour",
        steps=28, sampling=dict(guidance_scale=3.5, max_sequence_length=512),
    ),
    "qwen-image": Model(
        "Qwen-Image", build_qwen_image, tiny="qwen-image", prompt="a lighthouse on a cliff at dawn, oil painting",
        negative_prompt="blurry, low quality, distorted", steps=50, sampling=dict(true_cfg_scale=4.0),
    ),
    "qwen-image-edit": Model(
        "Qwen-Image-Edit", _build(build_qwen_image, edit=True), tiny="qwen-image-edit",
        prompt="make the sky purple and add a small red boat", negative_prompt="blurry, low quality, distorted",
        steps=50, sampling=dict(true_cfg_scale=4.0), input_image=True,
        # The tiny edit checkpoint's VAE downsamples 16x: sizes are multiples of 32.
        tiny_shape=dict(height=64, width=64),
    ),
    "sd3.5-large": Model(
        "Stable Diffusion 3.5 Large", build_sd35_large, tiny="sd3.5-medium",
        prompt="a red fox in the snow, detailed fur, golden hour", steps=28, sampling=dict(guidance_scale=3.5),
    ),
    **{
        f"wan2.1-{config}": Model(
            f"Wan2.1 T2V {config.upper()}", _build(build_wan, config), tiny="wan2.1-t2v",
            prompt="a cat surfing a wave at sunset, cinematic", negative_prompt="blurry, static, low quality",
            steps=50, sampling=dict(guidance_scale=5.0), kind="video", shape=WAN_480P, tiny_shape=TINY_VIDEO,
        )
        for config in ("1.3b", "14b")
    },
    "stable-audio": Model(
        "Stable Audio Open 1.0", build_stable_audio, tiny="stable-audio", prompt="a jazz drum loop with brushes",
        negative_prompt="low quality, hum", steps=100, sampling=dict(guidance_scale=7.0), kind="audio",
        # The tiny checkpoint generates at most 1 s.
        shape=dict(audio_end_in_s=10.0), tiny_shape=dict(audio_end_in_s=1.0),
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
    """Stage times of a diffusers pipeline call, from forward pre/post hooks on its text-side modules
    (text encoders, Stable Audio's projection model) and transformer and wrappers around its VAE's
    encode and decode (every VAE here has both; a call without an input image never encodes, so
    vae_encode_s is then absent). The spans follow diffserve's stages: encode = the call's start to
    the first transformer forward (prompts, input-image latents, noise), denoise = the first
    transformer forward's start to the last one's end, decode = from there to the call's end (VAE
    decode, post-processing). Also each component's own total time (the text-side modules together)."""

    TEXT_SIDE = ("text_encoder", "projection_model")  # name prefixes of the modules timed as text_encoder

    def __init__(self, pipe, timeline: Timeline):
        self.timeline = timeline
        self.spans: dict[str, list] = {}
        self.open: dict[str, object] = {}
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and (name == "transformer" or name.startswith(self.TEXT_SIDE)):
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
    shape: dict  # height/width, num_frames, audio_end_in_s: as the Model gives them
    sampling: dict
    seed: int
    kind: str  # a key of OUTPUTS


def sync(device: torch.device) -> None:
    torch.cuda.synchronize(device) if device.type == "cuda" else None


def diffserve_call(omni, req: Request, steps: int, device: torch.device):
    """(seconds, the output on the host (OUTPUTS), stage seconds)."""
    from diffserve import OmniDiffusionSamplingParams

    prompt = {"prompt": req.prompt, "seed": req.seed}
    prompt |= {"negative_prompt": req.negative_prompt} if req.negative_prompt is not None else {}
    prompt |= {"image": req.image} if req.image is not None else {}
    params = OmniDiffusionSamplingParams(num_inference_steps=steps, output_type="pt", **req.shape, **req.sampling)
    sync(device)
    start = time.perf_counter()
    out = omni.generate(prompt, params)[0]
    seconds = time.perf_counter() - start
    output = getattr(out, OUTPUTS[req.kind]["diffserve"]).float()
    return seconds, output, {k: v for k, v in out.metrics.items() if k.endswith("_s")}


def diffusers_call(pipe, probe: StageProbe, req: Request, steps: int, device: torch.device):
    """(seconds, the output on the host (OUTPUTS), stage seconds)."""
    extra = {"negative_prompt": req.negative_prompt} if req.negative_prompt is not None else {}
    extra |= {"image": req.image} if req.image is not None else {}
    sync(device)
    start = time.perf_counter()
    probe.start()
    with torch.inference_mode():
        result = pipe(prompt=req.prompt, num_inference_steps=steps, output_type="pt",
                      generator=torch.Generator("cpu").manual_seed(req.seed), **req.shape, **req.sampling, **extra)
    stages = probe.stop()
    output = getattr(result, OUTPUTS[req.kind]["diffusers"]).float().cpu()
    return time.perf_counter() - start, output, stages


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
        """Run call() -> (seconds, output, stages); record its time, stages and memory; return the output."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        seconds, output, stages = call()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            self.peak_gib = max(self.peak_gib or 0.0, peak / 2**30)
            self.request_peak_gib = max(self.request_peak_gib or 0.0, (peak - before) / 2**30)
        self.request_s.append(seconds)
        for key, value in stages.items():
            self.stages.setdefault(key, []).append(value)
        return output

    def summary(self) -> dict:
        return {"request_s": statistics.median(self.request_s), "request_s_all": self.request_s,
                "stages_s": {k: statistics.median(v) for k, v in self.stages.items()},
                "load_s": self.load_s, "weights_gib": self.weights_gib, "peak_gib": self.peak_gib,
                "request_peak_above_start_gib": self.request_peak_gib}


def output_stats(output: torch.Tensor, kind: str) -> dict:
    """A random-weight VAE may clamp most pixels to 0 or 1, which hides differences: the PSNR means
    something only when few pixels are saturated and the output varies. Audio has no fixed range:
    its largest magnitude (the PSNR's peak) is given instead."""
    stats = {"mean": output.mean().item(), "std": output.std().item()}
    if OUTPUTS[kind]["peak"] is None:
        return stats | {"peak_abs": output.abs().max().item()}
    return stats | {"saturated_fraction": ((output <= 0) | (output >= 1)).float().mean().item()}


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

    shape = model.tiny_shape if args.tiny else model.shape
    image = sample_image(shape["width"], shape["height"], 0) if model.input_image else None
    req = Request(model.prompt, model.negative_prompt, image, shape, model.sampling, args.seed, model.kind)
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
            output = ours.measure(lambda: diffserve_call(omni, req, args.steps, device), device)
            print(f"request {i + 1}/{args.repeats}: diffusers {theirs.request_s[-1]:.2f} s, diffserve "
                  f"{ours.request_s[-1]:.2f} s", flush=True)
    return {
        "model": args.model, "title": model.title, "checkpoint": path, "tiny": args.tiny,
        "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
        "text_encoder_layers": None if args.tiny else args.text_encoder_layers,
        "dtype": args.dtype, "output_kind": req.kind, "request_shape": req.shape,
        "output_shape": list(reference.shape), "steps": args.steps,
        "warmup_steps": args.warmup_steps, "repeats": args.repeats, "seed": args.seed,
        "prompt": req.prompt, "negative_prompt": req.negative_prompt,
        "input_image": f"{image.width}x{image.height}" if image is not None else None, "sampling": req.sampling,
        "compiled": {"diffusers": args.diffusers_compile, "diffserve": args.compile}, "warmup_s": warmup_s,
        "diffusers": theirs.summary(), "diffserve": ours.summary(),
        "speedup": statistics.median(theirs.request_s) / statistics.median(ours.request_s),
        "output": agreement(output, reference, peak=OUTPUTS[req.kind]["peak"]),
        "diffusers_output_stats": output_stats(reference, req.kind),
        "latents": agreement(our_latents.latents, their_latents.latents),
        "outputs_finite": bool(torch.isfinite(output).all() and torch.isfinite(reference).all()),
    }


# -- report -------------------------------------------------------------------------------------------


def count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe_shape(shape: dict) -> str:
    """1024x1024 / 480x832, 81 frames / 10.0 s of audio."""
    parts = [f"{shape['height']}x{shape['width']}"] if "height" in shape else []
    parts += [f"{shape['num_frames']} frames"] if "num_frames" in shape else []
    parts += [f"{shape['audio_end_in_s']} s of audio"] if "audio_end_in_s" in shape else []
    return ", ".join(parts)


def report(result: dict) -> None:
    layers = (f"text encoders at the real width, {result['text_encoder_layers']} layers" if not result["tiny"]
              else "diffserve.testing's tiny checkpoint")
    sampling = ", ".join(f"{k} {v}" for k, v in result["sampling"].items())
    image = f", input image {result['input_image']}" if result["input_image"] else ""
    print(f"\n{result['title']} ({count(result['transformer_params'])} transformer, random {result['dtype']} "
          f"weights; {layers}): {describe_shape(result['request_shape'])}{image}, {result['steps']} steps, {sampling}"
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
    output, latents, kind = result["output"], result["latents"], result["output_kind"]
    stats = result["diffusers_output_stats"]
    spread = (f"{stats['saturated_fraction']:.1%} of the values at 0 or 1" if "saturated_fraction" in stats
              else f"peak {stats['peak_abs']:.3g}, the PSNR's peak")
    print(f"diffusers / diffserve request time: {result['speedup']:.3f}x")
    print(f"diffserve vs diffusers: {kind} {list(result['output_shape'])} PSNR {output['psnr_db']:.1f} dB, max abs "
          f"{output['max_abs_diff']:.3g} (diffusers' {kind}: std {stats['std']:.3f}, {spread}); "
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
    p.add_argument("--tiny", action="store_true", help="diffserve.testing's tiny checkpoint, fp32, 2 steps, small shape")
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
