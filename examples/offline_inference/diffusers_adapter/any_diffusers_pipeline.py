"""Serve a diffusers pipeline diffserve has no native port of, through the diffusers adapter.

    # PixArt-Sigma (no native pipeline: the engine falls back to diffusers' PixArtSigmaPipeline)
    python examples/offline_inference/diffusers_adapter/any_diffusers_pipeline.py \
        --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --prompt "a fox in the snow" --seed 0 --output fox.png

    # a video or audio pipeline works the same way (the output follows what the pipeline makes)
    python examples/offline_inference/diffusers_adapter/any_diffusers_pipeline.py \
        --model Lightricks/LTX-Video --prompt "waves at dusk" --num-frames 41 --output waves.mp4
    python examples/offline_inference/diffusers_adapter/any_diffusers_pipeline.py \
        --model cvssp/audioldm2 --prompt "rain on a tin roof" --audio-end-in-s 5 --output rain.wav

    # a natively supported model through diffusers' own pipeline instead (e.g. to compare)
    python examples/offline_inference/diffusers_adapter/any_diffusers_pipeline.py \
        --model black-forest-labs/FLUX.1-dev --backend diffusers --output flux.png

The adapter reads which sampling parameters the pipeline takes from its __call__ (a parameter it does
not take is refused, as for native models), batches prompts, seeds one CPU generator per prompt,
reports progress and stops between steps; --cache-backend cache_dit works for the pipelines cache-dit
supports. Parallel modes and tea_cache are native-only (a clear error at start). Without --model it
builds a tiny random-weight PixArt-Sigma first (noise, runs on a CPU in seconds).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from diffserve import Omni, OmniDiffusionSamplingParams


def save(out, path: str, modality: str) -> str:
    if modality == "video":
        from diffserve.media import write_video

        write_video(path, out.frames[0], out.metrics["fps"])
    elif modality == "audio":
        from diffserve.audio_io import write_audio

        write_audio(path, out.audio[0], out.sample_rate)
    else:
        out.images[0].save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny PixArt-Sigma)")
    parser.add_argument("--backend", default="auto", help="auto (default), native or diffusers")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None, help="video pipelines")
    parser.add_argument("--audio-end-in-s", type=float, default=None, help="audio pipelines: the clip's length")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-backend", default=None, help="cache_dit, for the pipelines cache-dit supports")
    parser.add_argument("--output", default="any_diffusers_pipeline.png",
                        help=".png for images, .mp4 for videos, .wav for audio")
    args = parser.parse_args()

    model = args.model
    if model is None:
        from diffserve.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint("pixart-sigma", tempfile.mkdtemp(prefix="tiny-pixart-sigma-"))
    params = OmniDiffusionSamplingParams(
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        audio_end_in_s=args.audio_end_in_s,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
    )
    prompts = args.prompt or ["a lighthouse on a cliff at sunset", "a bowl of ramen, studio lighting"]
    with Omni(model=model, backend=args.backend, dtype=args.dtype, cache_backend=args.cache_backend) as omni:
        spec = omni.engine.spec
        print(f"{spec.model} ({omni.od_config.resolved_backend} backend): makes {spec.modality}; takes "
              f"{', '.join(sorted(spec.accepted_params))}; defaults {dict(spec.defaults)}")
        outputs = omni.generate(prompts, params)
    stem, ext = os.path.splitext(args.output)
    for i, out in enumerate(outputs):
        path = save(out, args.output if i == 0 else f"{stem}_{i}{ext}", spec.modality)
        timings = ", ".join(f"{k}={v:.3f}" for k, v in out.metrics.items() if k.endswith("_s"))
        print(f"{path}: seed {out.seed}; {timings}")


if __name__ == "__main__":
    main()
