"""Text-to-image on one GPU with the speed options of docs/speed.md, timed against the plain engine.

    # CUDA graphs (bit-equal; pays for small images, batches and models)
    python examples/offline_inference/text_to_image/fast_one_gpu.py --cuda-graphs
    # FLUX.1-dev with FP8 matmuls and FP8 attention (Hopper; pip install nvidia-cudnn-frontend)
    python examples/offline_inference/text_to_image/fast_one_gpu.py --model black-forest-labs/FLUX.1-dev \
        --fp8 --fp8-attention --cuda-graphs --height 1024 --width 1024
    # FP8 after 4 unquantized steps: pictures closer to bf16, the weights held twice
    python examples/offline_inference/text_to_image/fast_one_gpu.py --fp8 --unquantized-steps 4

It runs the same prompts and seeds twice, without and with the options, and prints the time per
image of each and the PSNR between their pictures (identical pictures print inf). Without --model it
uses the built-in demo model. The options need a CUDA GPU (the engine says so otherwise).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from diffserve import Omni, OmniDiffusionSamplingParams


def run(model: str, options: dict, prompts: list[str], params: OmniDiffusionSamplingParams, repeats: int):
    with Omni(model=model, dtype="bfloat16", disable_progress_bar=True, **options) as omni:
        omni.generate(prompts, params)  # warm-up at the timed batch size: compiles, and records CUDA graphs
        start = time.perf_counter()
        for _ in range(repeats):
            outputs = omni.generate(prompts, params)
        seconds = (time.perf_counter() - start) / (repeats * len(prompts))
    return seconds, [np.asarray(out.images[0], dtype=np.float64) for out in outputs]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint folder, hub id, or demo (the default)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over the prompts")
    parser.add_argument("--cuda-graphs", action="store_true", help="cuda_graphs=True")
    parser.add_argument("--fp8", action="store_true", help='quantization="fp8"')
    parser.add_argument("--fp8-attention", action="store_true", help='attention_backend="cudnn_fp8"')
    parser.add_argument("--unquantized-steps", type=int, default=0, metavar="N",
                        help="with --fp8: the first N steps of each request with the original weights")
    args = parser.parse_args()

    options = {}
    if args.cuda_graphs:
        options["cuda_graphs"] = True
    if args.fp8:
        options["quantization"] = "fp8"
    if args.fp8_attention:
        options["attention_backend"] = "cudnn_fp8"
    if args.unquantized_steps:
        if not args.fp8:
            parser.error("--unquantized-steps needs --fp8")
        options["unquantized_steps"] = args.unquantized_steps
    if not options:
        parser.error("choose at least one of --cuda-graphs, --fp8, --fp8-attention")
    prompts = args.prompt or ["a red circle above a blue square", "a green triangle left of a yellow square"]
    params = OmniDiffusionSamplingParams(height=args.height, width=args.width, seed=0)

    plain_s, plain = run(args.model, {}, prompts, params, args.repeats)
    fast_s, fast = run(args.model, options, prompts, params, args.repeats)
    print(f"plain engine: {plain_s:.3f} s / image")
    print(f"with {options}: {fast_s:.3f} s / image ({plain_s / fast_s:.2f}x)")
    print("PSNR against the plain engine: " + ", ".join(f"{psnr(a, b):.1f} dB" for a, b in zip(plain, fast)))


if __name__ == "__main__":
    main()
