"""Text-to-video with the offline API (Wan2.1 / Wan2.2 T2V, Wan2.2 TI2V-5B).

    python examples/offline_inference/text_to_video/text_to_video.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        --prompt "a cat surfing a wave at sunset" --height 480 --width 832 --num-frames 81 --seed 0 --output cat.mp4

    # Wan2.2 A14B: two experts, with a separate guidance scale for the low-noise one
    python examples/offline_inference/text_to_video/text_to_video.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers \
        --prompt "..." --guidance-scale 4.0 --guidance-scale-2 3.0

    # Wan2.1 14B on 4 GPUs: CFG branches on 2 x 2 Ulysses ranks, VAE tiles decoded on all 4
    python examples/offline_inference/text_to_video/text_to_video.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers \
        --prompt "..." --cfg-parallel-size 2 --ulysses-degree 2 --vae-patch-parallel-size 4

Without --model it builds a tiny random-weight Wan2.2 (two-expert) checkpoint first (noise-like
output, runs on CPU in seconds; the parallel flags then run CPU worker processes).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.media import write_mp4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny Wan2.2)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None, help="4k+1 (default 81)")
    parser.add_argument("--fps", type=int, default=None, help="MP4 frame rate (default: the model's, 16 or 24)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--guidance-scale-2", type=float, default=None, help="Wan2.2 A14B low-noise expert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parallel = parser.add_argument_group("parallelism (one process per GPU; see docs/parallelism.md)")
    for flag in ("tensor-parallel-size", "ulysses-degree", "ring-degree", "cfg-parallel-size",
                 "vae-patch-parallel-size"):
        parallel.add_argument(f"--{flag}", type=int, default=1)
    parser.add_argument("--output", default="text_to_video.mp4")
    args = parser.parse_args()

    model, tiny = args.model, args.model is None
    if tiny:
        from diffserve.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint("wan2.2-t2v", tempfile.mkdtemp(prefix="tiny-wan-"))
    prompts = args.prompt or ["a cat surfing a wave at sunset"]
    params = OmniDiffusionSamplingParams(
        height=args.height or (48 if tiny else None),
        width=args.width or (80 if tiny else None),
        num_frames=args.num_frames or (9 if tiny else None),
        fps=args.fps,
        num_inference_steps=args.steps or (4 if tiny else None),
        guidance_scale=args.guidance_scale,
        guidance_scale_2=args.guidance_scale_2,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
    )
    degrees = dict(tensor_parallel_size=args.tensor_parallel_size, ulysses_degree=args.ulysses_degree,
                   ring_degree=args.ring_degree, cfg_parallel_size=args.cfg_parallel_size,
                   vae_patch_parallel_size=args.vae_patch_parallel_size)
    with Omni(model=model, dtype=args.dtype, **degrees) as omni:
        outputs = omni.generate(prompts, params)
    stem, ext = os.path.splitext(args.output)
    for i, out in enumerate(outputs):
        path = args.output if i == 0 else f"{stem}_{i}{ext}"
        frames = out.frames[0]  # uint8 [frames, height, width, 3]
        write_mp4(path, frames, fps=out.metrics["fps"])
        timings = ", ".join(f"{k}={v:.3f}" for k, v in out.metrics.items() if k.endswith("_s"))
        print(f"{path}: {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} at {out.metrics['fps']} fps, "
              f"seed {out.seed}; {timings}")


if __name__ == "__main__":
    main()
