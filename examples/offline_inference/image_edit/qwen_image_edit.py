"""Image editing with the offline API (Qwen-Image-Edit, Qwen-Image-Edit-2509/2511).

    python examples/offline_inference/image_edit/qwen_image_edit.py \
        --model Qwen/Qwen-Image-Edit-2509 --image cat.png --image sofa.png \
        --prompt "the cat from picture 1 sleeping on the sofa of picture 2" --negative-prompt " " --seed 0

Every --image goes to the one prompt (Qwen-Image-Edit takes one image, Edit-2509/2511 up to three).
Without --height/--width the output keeps the aspect ratio of the first (Edit) or last (Edit-Plus)
image at about 1024 x 1024 pixels. A negative prompt turns on true classifier-free guidance at the
model's default scale (4.0; --true-cfg-scale to change it). Several GPUs: --ulysses-degree,
--ring-degree and --cfg-parallel-size split the work (docs/parallelism.md). Without --model it builds a
tiny random-weight Qwen-Image-Edit-Plus checkpoint, and without --image it draws two pictures, so it
runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import tempfile

from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny Edit-Plus)")
    parser.add_argument("--image", action="append", help="an input image; repeat for several (Edit-Plus)")
    parser.add_argument("--prompt", default="make the sky purple")
    parser.add_argument("--negative-prompt", default=None, help="turns on true CFG (use ' ' for an empty one)")
    parser.add_argument("--true-cfg-scale", type=float, default=None, help="default: the model's, 4.0")
    parser.add_argument("--height", type=int, default=None, help="default: from the input image")
    parser.add_argument("--width", type=int, default=None, help="default: from the input image")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--vae-use-tiling", action="store_true", help="decode large images in tiles")
    parser.add_argument("--output", default="qwen_image_edit.png")
    parallel = parser.add_argument_group("parallelism (one process per GPU; see docs/parallelism.md)")
    for flag in ("ulysses-degree", "ring-degree", "cfg-parallel-size"):
        parallel.add_argument(f"--{flag}", type=int, default=1)
    args = parser.parse_args()

    model, tiny = args.model, args.model is None
    if tiny:
        from diffserve.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint("qwen-image-edit-plus", tempfile.mkdtemp(prefix="tiny-qwen-edit-plus-"))
    if args.image:
        images = [Image.open(path) for path in args.image]  # converted to RGB by the engine
    else:
        from diffserve.testing.conformance import sample_image

        images = [sample_image(64, 48, 0), sample_image(48, 64, 1)]

    params = OmniDiffusionSamplingParams(
        height=args.height or (96 if tiny else None),
        width=args.width or (128 if tiny else None),
        num_inference_steps=args.steps or (4 if tiny else None),
        true_cfg_scale=args.true_cfg_scale,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
    )
    degrees = dict(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
                   cfg_parallel_size=args.cfg_parallel_size)
    with Omni(model=model, dtype=args.dtype, vae_use_tiling=args.vae_use_tiling, **degrees) as omni:
        out = omni.generate({"prompt": args.prompt, "image": images}, params)[0]
    out.images[0].save(args.output)
    timings = ", ".join(f"{k}={v:.3f}" for k, v in out.metrics.items() if k.endswith("_s"))
    print(f"{args.output}: {out.images[0].width}x{out.images[0].height} from {len(images)} image(s), "
          f"seed {out.seed}; {timings}")


if __name__ == "__main__":
    main()
