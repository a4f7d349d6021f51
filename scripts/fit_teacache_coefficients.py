"""Fit TeaCache rescale coefficients for a checkpoint (see diffserve/cache/teacache/fit.py).

    python scripts/fit_teacache_coefficients.py [--model DIR] [--prompts-file F] [--seeds 2] [--steps N]
        [--params '{"height": 480, "width": 832, "num_frames": 81}']

Without --model it fits the built-in demo model on its held-out validation captions (never the test
captions the quality test uses). For a checkpoint without published coefficients (e.g. Wan2.2's), fit
at the resolution, frame count and step count it will serve (`--params`, `--steps`), on real weights.
Prints the coefficients to declare as the transformer's
`_teacache_coefficients` (or to pass as cache_config["coefficients"]) and the fit's quality.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.cache.teacache.fit import ChangeRecorder, fit_coefficients
from diffserve.models.interface import discover_components


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts-file", default=None, help="one prompt per line")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="denoise steps (model default if unset)")
    parser.add_argument("--params", default="{}", help="more sampling parameters as JSON (size, frames, ...)")
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    if args.model is None:
        from diffserve.assets import default_model_path
        from diffserve.demo import scenes

        model, prompts = default_model_path(), scenes.held_out_captions("validation")
    else:
        model = args.model
        prompts = [line.strip() for line in open(args.prompts_file) if line.strip()] if args.prompts_file else [
            "a photo of a red fox in the snow", "a city street at night in the rain", "a bowl of fruit on a table"]
    with Omni(model, dtype=args.dtype, device=args.device, disable_progress_bar=True, max_batch_size=1) as omni:
        pipeline = omni.engine.executor.worker.pipeline
        recorders = [ChangeRecorder(m) for m in discover_components(pipeline)["dit"].values()]
        for prompt in prompts:
            for seed in range(args.seeds):
                for r in recorders:
                    r.new_request()
                omni.generate(prompt, OmniDiffusionSamplingParams(seed=seed, num_inference_steps=args.steps,
                                                                  **json.loads(args.params)))
        pairs = [p for r in recorders for p in r.pairs]
    coefficients = fit_coefficients(pairs, args.degree)
    x, y = np.asarray(pairs).T
    fitted = np.polyval(coefficients, x)
    r2 = 1 - np.sum((y - fitted) ** 2) / np.sum((y - y.mean()) ** 2)
    print(f"{len(pairs)} step pairs from {len(prompts)} prompts x {args.seeds} seeds; fit R^2 = {r2:.3f}")
    print(f"input change range [{x.min():.4f}, {x.max():.4f}], output change range [{y.min():.4f}, {y.max():.4f}]")
    print("_teacache_coefficients = (" + ", ".join(f"{c:.8e}" for c in coefficients) + ")")


if __name__ == "__main__":
    main()
