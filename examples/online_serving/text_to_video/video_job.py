"""Create a video job on a running `diffserve serve VIDEO_MODEL`, follow its progress, download the MP4.

    diffserve serve /models/Wan2.1-T2V-1.3B          # or: diffserve make-tiny wan2.1-t2v /tmp/w && diffserve serve /tmp/w
    python examples/online_serving/text_to_video/video_job.py --prompt "a cat surfing" --size 832x480 --frames 81
"""

from __future__ import annotations

import argparse
import time

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--prompt", default="a cat surfing")
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--frames", type=int, default=81, help="4k+1 for Wan")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="served.mp4")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key=args.api_key)
    extra = {"num_frames": args.frames, "seed": args.seed} | ({"num_inference_steps": args.steps} if args.steps else {})
    job = client.videos.create(prompt=args.prompt, size=args.size, extra_body=extra)
    print(f"job {job.id}: {job.status}")
    while job.status in ("queued", "in_progress"):
        time.sleep(1)
        job = client.videos.retrieve(job.id)
        print(f"  {job.status} {job.progress}%")
    if job.status != "completed":
        raise SystemExit(f"job failed: {job.error}")
    client.videos.download_content(job.id).write_to_file(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
