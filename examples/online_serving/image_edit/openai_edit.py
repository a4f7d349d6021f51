"""Edit images on a running `diffserve serve` (an editing model) with the official openai client.

    diffserve serve Qwen/Qwen-Image-Edit-2509      # in another terminal
    python examples/online_serving/image_edit/openai_edit.py --image cat.png --image sofa.png \
        --prompt "the cat from picture 1 sleeping on the sofa of picture 2"

Every --image goes to the one prompt (Qwen-Image-Edit takes one, Edit-2509/2511 up to three). Size
"auto" (the default) keeps the aspect ratio of the model's sizing image at about 1024 x 1024 pixels.
"""

from __future__ import annotations

import argparse
import base64

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    parser.add_argument("--image", action="append", required=True, help="an input image file; repeat for several")
    parser.add_argument("--prompt", default="make the sky purple")
    parser.add_argument("--negative-prompt", default=None, help="turns on true CFG (use ' ' for an empty one)")
    parser.add_argument("--size", default="auto", help="WxH, or auto (from the input image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--output", default="edited.png")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key=args.api_key)
    extra = {"seed": args.seed}
    if args.steps:
        extra["num_inference_steps"] = args.steps
    if args.negative_prompt is not None:
        extra["negative_prompt"] = args.negative_prompt
    files = [open(path, "rb") for path in args.image]
    try:
        result = client.images.edit(image=files, prompt=args.prompt, size=args.size, extra_body=extra)
    finally:
        for f in files:
            f.close()
    with open(args.output, "wb") as f:
        f.write(base64.b64decode(result.data[0].b64_json))
    print(f"wrote {args.output} ({result.size}, seed {result.model_extra.get('seed')})")


if __name__ == "__main__":
    main()
