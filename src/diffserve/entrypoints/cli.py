"""The `diffserve` command line: generate, serve, make-tiny, models.

`--help` imports nothing heavy (no torch): each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

# (flag, config key, type, help). One table so `generate`, and later `serve` and `bench`, share them.
ENGINE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--backend", "backend", str,
     "auto (diffserve's native pipeline if it has one, else diffusers' pipeline through the adapter), native or "
     "diffusers"),
    ("--dtype", "dtype", str, "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--revision", "revision", str, "hub revision when MODEL is a hub id"),
    ("--attention-backend", "attention_backend", str, "sdpa (default), flash_attn, sage_attn or cudnn_fp8 (FP8 attention, Hopper+, lossy)"),
    ("--max-batch-size", "max_batch_size", int, "most prompts merged into one pipeline call (default 4)"),
    ("--tensor-parallel-size", "tensor_parallel_size", int, "tensor parallel degree"),
    ("--ulysses-degree", "ulysses_degree", int, "Ulysses sequence parallel degree"),
    ("--ring-degree", "ring_degree", int, "ring sequence parallel degree"),
    ("--cfg-parallel-size", "cfg_parallel_size", int, "1, or 2 to run the CFG branches on two ranks"),
    ("--vae-patch-parallel-size", "vae_patch_parallel_size", int, "ranks that share the tiled VAE decode"),
    ("--data-parallel-size", "data_parallel_size", int,
     "replicas of the model, each on its own devices (replica r of k ranks on GPUs r*k..(r+1)*k-1)"),
    ("--hsdp-shard-size", "hsdp_shard_size", int, "HSDP shard group size (-1: all ranks)"),
    ("--hsdp-replicate-size", "hsdp_replicate_size", int, "HSDP replica count"),
    ("--cache-backend", "cache_backend", str, "step cache: cache_dit or tea_cache (default none)"),
    ("--quantization", "quantization", str, "fp8: the transformer blocks' attention and feed-forward in float8 (Ada/Hopper/Blackwell GPUs; default none)"),
    ("--unquantized-steps", "unquantized_steps", int,
     "with --quantization: the first N steps of each request use the original weights, kept beside the "
     "quantized ones (closer pictures, more memory; default 0)"),
    ("--layerwise-prefetch", "layerwise_prefetch", int,
     "with --enable-layerwise-offload: blocks copied ahead of the running one (default 1; 0: none)"),
    ("--layerwise-resident-blocks", "layerwise_resident_blocks", int,
     "with --enable-layerwise-offload: blocks of each transformer kept on the GPU, spread through the call "
     "order (default 0): fewer bytes copied per step, more memory"),
    ("--ffn-chunk-size", "ffn_chunk_size", int,
     "tokens the transformers' feed-forward layers take at a time (default: whole sequences); less "
     "activation memory for long sequences"),
    ("--max-gpu-memory", "max_gpu_memory", float,
     "GiB of weights the GPU may hold; checked at start, naming the offload modes that would fit"),
    ("--profile-dir", "profile_dir", str, "where profiler traces go"),
]
ENGINE_SWITCHES: list[tuple[str, str, str]] = [
    ("--enforce-eager", "enforce_eager", "do not torch.compile the transformer blocks"),
    ("--cuda-graphs", "cuda_graphs",
     "replay each transformer forward as a CUDA graph (per input shape; CUDA, one process, no step cache, "
     "offload, LoRA or step batching)"),
    ("--use-hsdp", "use_hsdp", "shard the transformer weights with FSDP2 (HSDP)"),
    ("--vae-use-tiling", "vae_use_tiling", "decode large latents in overlapping tiles (less memory)"),
    ("--vae-use-slicing", "vae_use_slicing", "encode and decode a batch one sample at a time (less memory)"),
    ("--enable-cpu-offload", "enable_cpu_offload",
     "model-level CPU offload: encoders, transformers and VAE on the GPU only while in use"),
    ("--enable-layerwise-offload", "enable_layerwise_offload",
     "layerwise CPU offload: transformer blocks stream through the GPU a few at a time"),
    ("--disable-progress-bar", "disable_progress_bar", "no progress bar"),
    ("--step-preemption", "step_preemption",
     "with --batching step: when a request of another shape or CFG mode has waited --step-max-wait steps, park "
     "the running requests (their states kept) and start it at once, instead of draining the batch first"),
]
# Step-level batching (docs/step_batching.md), in a group of their own; --step-preemption is a switch above.
BATCHING_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--step-max-wait", "step_max_wait", int,
     "with --batching step: steps a request of another shape or CFG mode waits before the running batch stops "
     "admitting (default 8)"),
    ("--step-max-batch-tokens", "step_max_batch_tokens", int,
     "with --batching step: a request joins the running batch only while its activation tokens (samples x "
     "latent tokens x CFG branches) stay within this (default: no cap but --max-batch-size)"),
    ("--step-latency-target-ms", "step_latency_target_ms", float,
     "with --batching step: a request joins only while the batch's measured step time with it stays within "
     "this (default: no cap)"),
    ("--step-min-batch-gain", "step_min_batch_gain", float,
     "with --batching step: a request joins only while the bigger batch's measured step time per sample is at "
     "least this fraction lower (0 < gain < 1): the batch stops growing where the GPU is saturated (default: "
     "no cap)"),
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it is a real value (engine flags default to None: the config's
    default applies, which their help text states)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def name_value(value_type):
    """An argparse type for NAME=VALUE items (VALUE converted by `value_type`)."""

    def parse(item: str) -> tuple[str, Any]:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {item!r}")
        try:
            return name, value_type(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not a {value_type.__name__}") from None

    return parse


def pairs_to_dict(pairs: list[tuple[str, Any]] | None, flag: str) -> dict[str, Any] | None:
    if pairs is None:
        return None
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{flag} names {', '.join(repeated)} more than once")
    return dict(pairs)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for flag, _, typ, help_text in ENGINE_FLAGS:
        group.add_argument(flag, type=typ, default=None, help=help_text)
    group.add_argument("--cache-config", type=json.loads, default=None, help="cache options as JSON")
    group.add_argument("--lora-modules", type=name_value(str), nargs="+", default=None, metavar="NAME=PATH",
                       help="LoRA adapters to load (.safetensors, diffusers/PEFT or kohya FLUX); requests pick them "
                            "by name (docs/lora.md)")
    for flag, _, help_text in ENGINE_SWITCHES:
        group.add_argument(flag, action="store_true", default=None, help=help_text)
    step = parser.add_argument_group("batching (docs/step_batching.md)")
    step.add_argument("--batching", choices=("request", "step"), default=None,
                      help="request (default): a batch runs from its first step to its last; step: requests join "
                           "and leave a running batch between denoise steps (the models docs/step_batching.md "
                           "lists; step caches keep a state per request)")
    for flag, _, typ, help_text in BATCHING_FLAGS:
        step.add_argument(flag, type=typ, default=None, help=help_text)
    step.add_argument("--step-overlap-stages", action=argparse.BooleanOptionalAction, default=None,
                      help="with --batching step: encode joining requests and decode finished ones on a "
                           "background thread (its own CUDA stream) while the batch steps (default: off)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags the user gave: everything else keeps the config's default."""
    keys = ([key for _, key, _, _ in ENGINE_FLAGS + BATCHING_FLAGS] + [key for _, key, _ in ENGINE_SWITCHES]
            + ["cache_config", "batching", "step_overlap_stages"])
    kwargs = {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
    if getattr(args, "lora_modules", None) is not None:
        kwargs["lora_modules"] = pairs_to_dict(args.lora_modules, "--lora-modules")
    return kwargs


def output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [output] + [f"{stem}_{i}{ext}" for i in range(1, count)]


def load_image_arg(path: str):
    """The image file as decoded; its mode and size are checked (and it is converted to RGB) when the
    request is admitted."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read --image {path!r}: {exc}") from exc


DEFAULT_OUTPUT = {"image": "output.png", "video": "output.mp4", "audio": "output.wav"}


def save_outputs(output, path: str, modality: str) -> list[str]:
    """Write images (PNG/JPEG/WebP by extension), videos (MP4, animated GIF/WebP) at the rate the
    model ran with, or audio clips (WAV, FLAC with soundfile)."""
    from diffserve.audio_io import write_audio
    from diffserve.media import write_video

    items = {"video": output.frames, "audio": output.audio}.get(modality, output.images)
    paths = output_paths(path, len(items))
    for item, p in zip(items, paths):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        if modality == "video":
            write_video(p, item, output.metrics["fps"])
        elif modality == "audio":
            write_audio(p, item, output.sample_rate)
        else:
            item.save(p)
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from diffserve import Omni, OmniDiffusionSamplingParams
    from diffserve.logger import configure_logging

    configure_logging()
    prompt = {"prompt": args.prompt, "image": [load_image_arg(p) for p in args.image]} if args.image else args.prompt
    params = OmniDiffusionSamplingParams(
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        num_outputs_per_prompt=args.num_outputs,
        max_sequence_length=args.max_sequence_length,
        num_frames=args.num_frames,
        fps=args.fps,
        guidance_scale_2=args.guidance_scale_2,
        strength=args.strength,
        audio_start_in_s=args.audio_start_in_s,
        audio_end_in_s=args.audio_end_in_s,
        skip_guidance_layers=args.skip_guidance_layers,
        skip_layer_guidance_scale=args.skip_layer_guidance_scale,
        skip_layer_guidance_start=args.skip_layer_guidance_start,
        skip_layer_guidance_stop=args.skip_layer_guidance_stop,
        lora=pairs_to_dict(args.lora, "--lora"),
    )
    from diffserve.media import check_output_path

    with Omni(args.model, **engine_kwargs(args)) as omni:
        modality = omni.engine.spec.modality
        path = args.output or DEFAULT_OUTPUT[modality]
        check_output_path(path, modality)  # before the work, not after
        start = time.perf_counter()
        output = omni.generate(prompt, params)[0]
        elapsed = time.perf_counter() - start
    paths = save_outputs(output, path, modality)
    print(f"wrote {', '.join(paths)} (seed {output.seed}, {elapsed:.2f} s)")
    return 0


def _limit(seconds: float) -> float | None:
    """A time limit flag: 0 (or less) means none."""
    return seconds if seconds > 0 else None


def server_config(args: argparse.Namespace):
    """The ServerConfig of the flags add_server_args added (shared by `serve` and the Ray Serve app)."""
    from diffserve.config import ENV_API_KEY
    from diffserve.server.launch import parse_warmup
    from diffserve.server.state import ServerConfig

    return ServerConfig(
        served_model_names=args.served_model_name or [],
        api_key=args.api_key or ENV_API_KEY,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        jobs_dir=args.jobs_dir,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        body_timeout_s=args.body_timeout,
        request_timeout_s=_limit(args.request_timeout),
        max_work_s=_limit(args.request_timeout if args.max_work_seconds is None else args.max_work_seconds),
        max_n=args.max_n,
        job_queue_timeout_s=_limit(args.job_queue_timeout),
        job_timeout_s=_limit(args.job_timeout),
        job_ttl_s=_limit(args.job_ttl),
        max_job_storage_bytes=int(args.max_job_storage_gb * 1024**3) if args.max_job_storage_gb > 0 else None,
        step_timeout_s=_limit(args.step_timeout),
        shutdown_grace_s=args.shutdown_grace,
        warmup=parse_warmup(args.warmup) if args.warmup else [],
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from diffserve.logger import configure_logging
    from diffserve.server.launch import build_server, run_server

    configure_logging()
    config = server_config(args)
    app, state = build_server(args.model, engine_kwargs(args), config)
    print(f"serving {state.config.served_model_name!r} on http://{args.host}:{args.port} (loading the model; "
          "/health says ready when it is)", flush=True)
    run_server(app, state, args.host, args.port, log_level=args.uvicorn_log_level)
    if state.engine.load_error:
        print(f"diffserve: error: the model failed to load: {state.engine.load_error}", file=sys.stderr)
        return 1
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from diffserve.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.arch, args.path, seed=args.seed)
    print(f"wrote a tiny random-weight {args.arch} checkpoint to {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from diffserve.models.diffusers_adapter.features import describe_models

    print(describe_models())
    return 0


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The model and the app's flags (names, limits, timeouts), shared by `serve` and the Ray Serve app
    (diffserve.integrations.ray_serve); where to listen is each one's own."""
    parser.add_argument("model", nargs="?", default="demo",
                        help="checkpoint folder, hub id, or demo: the built-in demo model")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health and /metrics "
                             "(or set DIFFSERVE_API_KEY)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="model ids clients may use (default: the folder name); the MODEL argument as given "
                             "is always accepted too")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long the scheduler waits for compatible requests to fill a batch")
    parser.add_argument("--max-queue", type=int, default=256, help="queued requests before answering 429")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds an image or audio request may take from arrival (504 after; 0: no limit)")
    parser.add_argument("--max-work-seconds", type=float, default=None,
                        help="image or audio requests whose estimated denoising time exceeds this are refused "
                             "up front with 400 (default: the request timeout; 0: no limit)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (413 above)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a client may take to send its request body (408 after)")
    parser.add_argument("--max-n", type=int, default=8, help="most images one request may ask for (n)")
    parser.add_argument("--jobs-dir", default=None, help="where video jobs are kept (default ./diffserve_jobs)")
    parser.add_argument("--job-queue-timeout", type=float, default=3600.0,
                        help="seconds a video job may wait in the queue (0: no limit)")
    parser.add_argument("--job-timeout", type=float, default=7200.0,
                        help="seconds a video job may run, from its start; longer estimates are refused (0: no limit)")
    parser.add_argument("--job-ttl", type=float, default=7 * 24 * 3600.0,
                        help="seconds a finished video job and its file are kept (0: forever)")
    parser.add_argument("--max-job-storage-gb", type=float, default=10.0,
                        help="new video jobs are refused (507) while stored videos exceed this (0: no limit)")
    parser.add_argument("--step-timeout", type=float, default=600.0,
                        help="seconds without a finished denoise step before the workers count as wedged and are "
                             "restarted (0: no watchdog)")
    parser.add_argument("--warmup", default=None, metavar="SIZES",
                        help="run a short request at each WIDTHxHEIGHT[:BATCH] (comma-separated) before serving, so "
                             "compilation for those shapes happens at start; 1024x1024:1,1024x1024:2 covers every batch size "
                             "at 1024x1024 (batch 2 compiles a graph that larger batches reuse)")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="on SIGTERM, seconds the running batch gets to finish before it is stopped")


def build_parser() -> argparse.ArgumentParser:
    from diffserve.testing import TINY_ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog="diffserve",
        description="Inference and serving engine for diffusion models.",
        epilog="Run 'diffserve COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate an image, a video or audio from a prompt",
        description="Generate an image (PNG) or, with a video model, a video (MP4), or with an audio model a "
                    "clip (WAV) from a prompt and save it.",
        formatter_class=HelpFormatter,
    )
    gen.add_argument("prompt", help="the text prompt")
    gen.add_argument(
        "--model",
        default="demo",
        help="checkpoint folder (diffusers layout), hub id, or demo: the built-in demo model (64x64 coloured shapes)",
    )
    gen.add_argument(
        "-o", "--output", default=None,
        help="output file: .png/.jpg/.webp for images, .mp4/.gif/.webp for videos, .wav/.flac for audio "
             "(default output.png, output.mp4 or output.wav); several outputs get _1, _2, ...",
    )
    gen.add_argument("--negative-prompt", default=None, help="negative prompt (true CFG with --true-cfg-scale > 1)")
    gen.add_argument("--height", type=int, default=None, help="image height (model default if unset)")
    gen.add_argument("--width", type=int, default=None, help="image width (model default if unset)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (model default if unset)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (model default if unset)")
    gen.add_argument("--true-cfg-scale", type=float, default=None,
                     help="true CFG scale; > 1 with --negative-prompt enables it (unset: the model's default)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (random if unset; printed)")
    gen.add_argument("--num-outputs", type=int, default=1, help="images per prompt")
    gen.add_argument("--max-sequence-length", type=int, default=None, help="text encoder token limit")
    gen.add_argument("--image", action="append", default=None,
                     help="input image file; repeat it for models that take several (Qwen-Image-Edit-Plus). "
                          "Editing models edit it, image-to-video starts from it, FLUX: image-to-image")
    gen.add_argument("--strength", type=float, default=None,
                     help="image-to-image: share of the schedule the input is re-noised to, (0, 1]")
    gen.add_argument("--num-frames", type=int, default=None, help="video frames, 4k+1 for Wan (model default if unset)")
    gen.add_argument("--fps", type=int, default=None, help="video frame rate of the MP4 (model default if unset)")
    gen.add_argument(
        "--guidance-scale-2", type=float, default=None,
        help="guidance scale of the low-noise expert (Wan2.2 A14B); defaults to --guidance-scale",
    )
    gen.add_argument("--audio-start-in-s", type=float, default=None,
                     help="audio models: where the clip starts, in seconds (default 0)")
    gen.add_argument("--audio-end-in-s", type=float, default=None,
                     help="audio models: where the clip ends, in seconds (default: the model's longest clip)")
    slg = gen.add_argument_group("skip-layer guidance (SD3 / SD3.5, with CFG; see docs/models.md)")
    slg.add_argument("--skip-guidance-layers", type=int, nargs="+", default=None, metavar="BLOCK",
                     help="transformer blocks skipped for the guidance prediction (SD3.5-medium: 7 8 9)")
    slg.add_argument("--skip-layer-guidance-scale", type=float, default=None, help="its strength (model default 2.8)")
    slg.add_argument("--skip-layer-guidance-start", type=float, default=None,
                     help="fraction of the steps where it starts (model default 0.01)")
    slg.add_argument("--skip-layer-guidance-stop", type=float, default=None,
                     help="fraction of the steps where it stops (model default 0.2)")
    gen.add_argument("--lora", type=name_value(float), nargs="+", default=None, metavar="NAME=SCALE",
                     help="apply LoRA adapters loaded with --lora-modules, each at its scale")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    tiny = sub.add_parser(
        "make-tiny",
        help="write a tiny random-weight checkpoint (for tests and trying things out)",
        description="Write a tiny random-weight checkpoint in the diffusers layout.",
    )
    tiny.add_argument("arch", choices=sorted(TINY_ARCHITECTURES), help="architecture")
    tiny.add_argument("path", help="output folder")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed")
    tiny.set_defaults(func=cmd_make_tiny)

    serve = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (images, image edits, video jobs, audio).",
        formatter_class=HelpFormatter,
    )
    add_server_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--uvicorn-log-level", default="info", help="uvicorn's log level")
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="list the native pipeline classes and what the diffusers adapter serves")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffserve.config import UnknownKeyError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, UnknownKeyError) as exc:
        # User errors (bad flag values, unsupported model, bad size) get one clear line, no traceback.
        print(f"diffserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
