"""Generate images from a running `diffserve serve` with the official openai client.

    diffserve serve                       # in another terminal: the built-in demo model
    python examples/online_serving/text_to_image/openai_client.py --prompt "a red circle above a blue square"
"""

from __future__ import annotations

import argparse
import base64

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    parser.add_argument("--prompt", default="a red circle above a blue square")
    parser.add_argument("--size", default="auto", help="WxH, or auto for the model's default")
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--output", default="served.png")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key=args.api_key)
    extra = {"seed": args.seed} | ({"num_inference_steps": args.steps} if args.steps else {})
    result = client.images.generate(prompt=args.prompt, size=args.size, n=args.n, extra_body=extra)
    for i, image in enumerate(result.data):
        path = args.output if i == 0 else args.output.replace(".png", f"_{i}.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(image.b64_json))
        print(f"wrote {path} ({result.size}, seed {result.model_extra.get('seed')})")


if __name__ == "__main__":
    main()
