"""Step caching with the offline API: the same request without a cache, with Cache-DiT (DBCache) and
with TeaCache, and what each skipped.

    python examples/offline_inference/text_to_image/cache_acceleration.py --model DIR_OR_HUB_ID \
        --prompt "a fox in the snow" --steps 28 --seed 0

    # another threshold, as JSON (the keys of docs/cache.md)
    python examples/offline_inference/text_to_image/cache_acceleration.py --model DIR_OR_HUB_ID \
        --tea-cache-config '{"rel_l1_thresh": 0.4}' --cache-dit-config '{"residual_diff_threshold": 0.12}'

Without --model it uses the built-in demo model (trained weights, so the quality numbers mean
something; runs on a CPU), with the thresholds docs/cache.md measured on it: DBCache 0.24 and
TeaCache 0.03.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from diffserve import Omni, OmniDiffusionSamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint folder, hub id, or demo (the default)")
    parser.add_argument("--prompt", default="a red circle above a blue square")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (FLUX.1-dev: 28)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-dit-config", type=json.loads, default=None, help="cache_config for cache_dit")
    parser.add_argument("--tea-cache-config", type=json.loads, default=None, help="cache_config for tea_cache")
    parser.add_argument("--output-prefix", default="cache_acceleration")
    args = parser.parse_args()

    model = args.model
    # Unset keys take the model's own defaults (docs/cache.md, "Each model's defaults").
    configs = {"cache_dit": args.cache_dit_config or {}, "tea_cache": args.tea_cache_config or {}}
    params = dict(height=args.height, width=args.width, num_inference_steps=args.steps, seed=args.seed)

    reference = None
    for backend in (None, "cache_dit", "tea_cache"):
        engine = {"cache_backend": backend, "cache_config": configs[backend]} if backend else {}
        with Omni(model=model, dtype=args.dtype, **engine) as omni:
            out = omni.generate(args.prompt, OmniDiffusionSamplingParams(**params))[0]
        name = backend or "no_cache"
        path = f"{args.output_prefix}_{name}.png"
        out.images[0].save(path)
        pixels = np.asarray(out.images[0], dtype=np.float32) / 255
        reference = pixels if reference is None else reference
        steps = out.metrics["num_inference_steps"]
        line = f"{path}: denoise {out.metrics['denoise_s']:.2f} s"
        if backend:
            line += f", {out.metrics['cached_steps']} of {steps} steps from the cache"
            line += f", mean |difference| to no_cache {np.abs(pixels - reference).mean():.4f}"
        print(line)


if __name__ == "__main__":
    main()
