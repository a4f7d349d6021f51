"""LoRA adapters over HTTP with the official openai client.

    # in another terminal: a model with two adapters
    diffserve serve black-forest-labs/FLUX.1-dev --served-model-name flux \
        --lora-modules style=/path/to/style.safetensors detail=/path/to/detail.safetensors
    python examples/online_serving/lora/openai_lora.py --prompt "a fox in the snow"

The server lists each adapter as a model of its own ("flux:style"): asking for that model applies the
adapter at scale 1. Any request may also carry `"lora": {"name": scale, ...}` in its body (here through
`extra_body`) to set scales or stack adapters. This script lists the models, then runs the prompt on
the base model, on each adapter's model, and with all adapters stacked at --stack-scale.
"""

from __future__ import annotations

import argparse
import base64

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    parser.add_argument("--prompt", default="a red fox in the snow")
    parser.add_argument("--size", default="auto", help="WxH, or auto for the model's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--stack-scale", type=float, default=0.7)
    parser.add_argument("--output-prefix", default="served_lora")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key=args.api_key)
    models = client.models.list().data
    base = next(m.id for m in models if not (m.model_extra or {}).get("parent"))
    adapters = [m.id.removeprefix(f"{base}:") for m in models if (m.model_extra or {}).get("parent") == base]
    print(f"base model {base!r}, adapters {adapters}")

    extra = {"seed": args.seed} | ({"num_inference_steps": args.steps} if args.steps else {})
    runs = {"none": (base, {}), **{name: (f"{base}:{name}", {}) for name in adapters}}
    if adapters:
        runs["stacked"] = (base, {"lora": {name: args.stack_scale for name in adapters}})
    for label, (model, body) in runs.items():
        result = client.images.generate(model=model, prompt=args.prompt, size=args.size, extra_body=extra | body)
        path = f"{args.output_prefix}_{label}.png"
        with open(path, "wb") as f:
            f.write(base64.b64decode(result.data[0].b64_json))
        print(f"wrote {path} (model {model!r}{', ' + str(body['lora']) if body else ''})")


if __name__ == "__main__":
    main()
