"""Step caching with the offline API: the same request without a cache, with Cache-DiT (DBCache) and
with TeaCache, and what each skipped.

    python examples/offline_inference/text_to_image/cache_acceleration.py --model DIR_OR_HUB_ID \
        --prompt "a fox in the snow" --steps 28 --seed 0

    # another threshold, as JSON (the keys of docs/cache.md)
    python examples/offline_inference/text_to_image/cache_acceleration.py --model DIR_OR_HUB_ID \
        --tea-cache-config '{"rel_l1_thresh": 0.4}' --cache-dit-config '{"residual_diff_threshold": 0.12}'

Without --model it builds a tiny random-weight FLUX checkpoint first (noise-like output, runs on CPU);
there, permissive thresholds are used so that something is skipped at all.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from diffserve import Omni, OmniDiffusionSamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny FLUX)")
    parser.add_argument("--prompt", default="a red fox in the snow")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (FLUX.1-dev: 28)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-dit-config", type=json.loads, default=None, help="cache_config for cache_dit")
    parser.add_argument("--tea-cache-config", type=json.loads, default=None, help="cache_config for tea_cache")
    parser.add_argument("--output-prefix", default="cache_acceleration")
    args = parser.parse_args()

    model, configs = args.model, {"cache_dit": args.cache_dit_config or {}, "tea_cache": args.tea_cache_config or {}}
    params = dict(height=args.height, width=args.width, num_inference_steps=args.steps, seed=args.seed)
    if model is None:
        from diffserve.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint("flux", tempfile.mkdtemp(prefix="tiny-flux-"))
        params.update(height=args.height or 64, width=args.width or 64, num_inference_steps=args.steps or 8)
        # Random tiny weights change a lot from step to step: only loose thresholds skip anything.
        configs = {
            "cache_dit": args.cache_dit_config or {"residual_diff_threshold": 0.9, "max_warmup_steps": 1},
            "tea_cache": args.tea_cache_config or {"rel_l1_thresh": 0.8},
        }

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
