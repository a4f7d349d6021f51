"""LoRA adapters with the offline API: load several at start, choose them (and their scales) per request.

    python examples/offline_inference/lora/lora_adapters.py --model black-forest-labs/FLUX.1-dev \
        --lora-module style=/path/to/style_lora.safetensors --lora-module detail=/path/to/detail.safetensors \
        --prompt "a fox in the snow, watercolor" --seed 0

Adapter files in the diffusers/PEFT layout (what `pipe.save_lora_weights` writes) or kohya's (FLUX.1)
load as they are. The same prompt and seed run without an adapter, with each adapter, and with all of
them stacked at --stack-scale each; requests alternate adapters without reloading anything. Without
--model it builds a tiny random-weight FLUX.1 checkpoint and two random adapters, so it runs on a CPU
in seconds.
"""

from __future__ import annotations

import argparse
import tempfile

from diffserve import Omni, OmniDiffusionSamplingParams


def tiny_model_and_adapters() -> tuple[str, dict[str, str]]:
    from diffserve.testing import make_tiny_checkpoint
    from diffserve.testing.lora import write_random_lora

    folder = tempfile.mkdtemp(prefix="tiny-flux-lora-")
    model = make_tiny_checkpoint("flux", f"{folder}/model")
    adapters = {
        "style": write_random_lora(model, f"{folder}/style.safetensors", ("to_q", "to_k", "to_v", "proj_mlp"), seed=1),
        "detail": write_random_lora(model, f"{folder}/detail.safetensors", ("ff.net.0.proj", "proj_out"), seed=2),
    }
    return model, adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny FLUX.1)")
    parser.add_argument("--lora-module", action="append", metavar="NAME=PATH", help="an adapter; repeat for more")
    parser.add_argument("--prompt", default="a red fox in the snow")
    parser.add_argument("--stack-scale", type=float, default=0.7, help="each adapter's scale when all are stacked")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output-prefix", default="lora")
    args = parser.parse_args()

    if args.model is None:
        model, adapters = tiny_model_and_adapters()
    else:
        model = args.model
        adapters = dict(item.split("=", 1) for item in args.lora_module or [])
    if not adapters:
        parser.error("give at least one --lora-module NAME=PATH with --model")

    # What each run asks for: {adapter name: scale}; None runs the base model.
    runs = {"none": None, **{name: {name: 1.0} for name in adapters}}
    if len(adapters) > 1:
        runs["stacked"] = {name: args.stack_scale for name in adapters}
    with Omni(model=model, dtype=args.dtype, lora_modules=adapters) as omni:
        for label, lora in runs.items():
            params = OmniDiffusionSamplingParams(height=args.height, width=args.width, num_inference_steps=args.steps,
                                                 seed=args.seed, lora=lora)
            out = omni.generate(args.prompt, params)[0]
            path = f"{args.output_prefix}_{label}.png"
            out.images[0].save(path)
            print(f"{path}: lora={lora} ({out.metrics['pipeline_s']:.2f} s)")


if __name__ == "__main__":
    main()
