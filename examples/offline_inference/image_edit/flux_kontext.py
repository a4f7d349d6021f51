"""Image editing with FLUX.1 Kontext and the offline API.

    python examples/offline_inference/image_edit/flux_kontext.py \
        --model black-forest-labs/FLUX.1-Kontext-dev --image cat.png \
        --prompt "give the cat a small red hat" --seed 0 --output cat_hat.png

Each prompt edits its own image (one image per prompt); repeat --prompt and --image for a batch, or
give one --image for every prompt. The image is resized to the Kontext training size nearest its
aspect ratio (--no-auto-resize keeps its own size); the output keeps its aspect ratio at about
--max-area pixels (default 1024x1024) unless --height and --width are given. Without --model it
builds a tiny random-weight Kontext checkpoint, and without --image it draws a test picture, so it
runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny FLUX.1 Kontext)")
    parser.add_argument("--image", action="append", help="the image to edit; repeat, one per --prompt")
    parser.add_argument("--prompt", action="append", help="the edit instruction; repeat for a batch")
    parser.add_argument("--negative-prompt", default=None, help="with --true-cfg-scale > 1")
    parser.add_argument("--true-cfg-scale", type=float, default=1.0)
    parser.add_argument("--height", type=int, default=None, help="output height (with --width)")
    parser.add_argument("--width", type=int, default=None, help="output width (with --height)")
    parser.add_argument("--max-area", type=int, default=None, help="output pixels when no size is given")
    parser.add_argument("--no-auto-resize", action="store_true", help="keep the input image's own size")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="distilled guidance (default 2.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output", default="flux_kontext.png")
    args = parser.parse_args()

    model = args.model
    if model is None:
        from diffserve.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint("flux-kontext", tempfile.mkdtemp(prefix="tiny-flux-kontext-"))
    prompts = args.prompt or ["make the sky purple"]
    if args.image:
        images = [Image.open(path).convert("RGB") for path in args.image]
    else:
        from diffserve.testing.conformance import sample_image

        images = [sample_image(64, 48, seed=0)]
    if len(images) == 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        parser.error(f"got {len(images)} --image for {len(prompts)} --prompt; give one image, or one per prompt")

    # A tiny checkpoint's own defaults keep each image's size and a 32x32-pixel output area.
    params = OmniDiffusionSamplingParams(
        height=args.height,
        width=args.width,
        max_area=args.max_area,
        auto_resize=False if args.no_auto_resize else None,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        seed=args.seed,
    )
    with Omni(model=model, dtype=args.dtype) as omni:
        outputs = omni.generate([{"prompt": p, "image": im} for p, im in zip(prompts, images)], params)
    stem, ext = os.path.splitext(args.output)
    for i, out in enumerate(outputs):
        path = args.output if i == 0 else f"{stem}_{i}{ext}"
        out.images[0].save(path)
        timings = ", ".join(f"{k}={v:.3f}" for k, v in out.metrics.items() if k.endswith("_s"))
        print(f"{path}: {out.images[0].width}x{out.images[0].height}, seed {out.seed}; {timings}")


if __name__ == "__main__":
    main()
