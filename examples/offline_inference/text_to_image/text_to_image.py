"""Text-to-image with the offline API (FLUX.1, SD3 / SD3.5, or any supported image model).

    python examples/offline_inference/text_to_image/text_to_image.py --model DIR_OR_HUB_ID \
        --prompt "a fox in the snow" --height 1024 --width 1024 --seed 0 --output fox.png

    # SD3.5-medium with skip-layer guidance on blocks 7, 8, 9 (it needs CFG: guidance_scale > 1)
    python examples/offline_inference/text_to_image/text_to_image.py \
        --model stabilityai/stable-diffusion-3.5-medium --prompt "a fox in the snow" \
        --guidance-scale 4.5 --steps 40 --skip-guidance-layers 7 8 9

Without --model it uses the built-in demo model, which draws coloured shapes on a CPU in about a second
(it knows a small vocabulary: colours, circle/square/triangle, above/below/left of/right of).
"""

from __future__ import annotations

import argparse

from diffserve import Omni, OmniDiffusionSamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint folder, hub id, or demo (the default)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--true-cfg-scale", type=float, default=None,
                        help="FLUX: true CFG with a negative prompt (unset: the model's default)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--skip-guidance-layers", type=int, nargs="+", default=None,
                        help="SD3 / SD3.5: skip-layer guidance on these transformer blocks")
    parser.add_argument("--skip-layer-guidance-scale", type=float, default=None)
    parser.add_argument("--skip-layer-guidance-stop", type=float, default=None, help="fraction of the steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output", default="text_to_image.png")
    args = parser.parse_args()

    prompts = args.prompt or ["a red circle above a blue square", "a green triangle left of a yellow square"]
    params = OmniDiffusionSamplingParams(
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        skip_guidance_layers=args.skip_guidance_layers,
        skip_layer_guidance_scale=args.skip_layer_guidance_scale,
        skip_layer_guidance_stop=args.skip_layer_guidance_stop,
        seed=args.seed,
    )
    with Omni(model=args.model, dtype=args.dtype) as omni:
        outputs = omni.generate(prompts, params)
    for i, out in enumerate(outputs):
        path = args.output if i == 0 else args.output.replace(".png", f"_{i}.png")
        out.images[0].save(path)
        timings = ", ".join(f"{k}={v:.3f}" for k, v in out.metrics.items() if k.endswith("_s"))
        print(f"{path}: seed {out.seed}; {timings}")


if __name__ == "__main__":
    main()
