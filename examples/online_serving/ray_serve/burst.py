"""Send a burst of concurrent image requests to diffserve on Ray Serve (or to `diffserve serve`) with the
official openai client, save the images and print the throughput.

    pip install 'diffserve[ray]'
    python -m diffserve.integrations.ray_serve demo --num-replicas 2 --device cpu    # in another terminal
    python examples/online_serving/ray_serve/burst.py --requests 16

Request i asks for seed SEED + i, so the same command gives the same images however many replicas
served them (and whichever did).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import os
import time

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the app's --api-key, if it has one")
    parser.add_argument("--prompt", default="a red circle above a blue square")
    parser.add_argument("--requests", type=int, default=16, help="requests sent at once")
    parser.add_argument("--size", default="auto", help="WxH, or auto for the model's default")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first request (request i: seed + i)")
    parser.add_argument("--output-dir", default="burst")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key=args.api_key, timeout=600)
    steps = {"num_inference_steps": args.steps} if args.steps else {}

    def one(i: int) -> str:
        result = client.images.generate(prompt=args.prompt, size=args.size, extra_body={"seed": args.seed + i, **steps})
        path = os.path.join(args.output_dir, f"{i}.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(result.data[0].b64_json))
        return path

    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
        paths = list(pool.map(one, range(args.requests)))
    elapsed = time.perf_counter() - start
    print(f"wrote {len(paths)} images to {args.output_dir}/ in {elapsed:.1f} s "
          f"({60 * len(paths) / elapsed:.1f} images/minute)")


if __name__ == "__main__":
    main()
