"""Text-to-audio from a running `diffserve serve AUDIO_MODEL` with the official openai client
(`client.audio.speech.create`), saved as WAV (or FLAC when the server has soundfile).

    diffserve serve stabilityai/stable-audio-open-1.0    # or: diffserve make-tiny stable-audio /tmp/a && diffserve serve /tmp/a
    python examples/online_serving/text_to_audio/openai_speech.py --prompt "a drum loop" --seconds 10 --output loop.wav

A text-to-audio model has no voices: `voice` is required by the client and ignored by the server.
diffserve's own fields (seconds, seed, num_inference_steps, guidance_scale, negative_prompt) go in
extra_body.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--prompt", default="a drum loop")
    parser.add_argument("--seconds", type=float, default=None, help="clip length (default: the model's longest)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="served.wav", help=".wav or .flac")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id  # the served model
    extra = {"seed": args.seed}
    if args.seconds is not None:
        extra["seconds"] = args.seconds
    if args.steps is not None:
        extra["num_inference_steps"] = args.steps
    response_format = os.path.splitext(args.output)[1].lstrip(".").lower() or "wav"
    response = client.audio.speech.create(model=model, voice="alloy", input=args.prompt,
                                          response_format=response_format, extra_body=extra)
    response.write_to_file(args.output)
    print(f"wrote {args.output} (seed {response.response.headers.get('x-seed')}, "
          f"{response.response.headers.get('x-sample-rate')} Hz)")


if __name__ == "__main__":
    main()
