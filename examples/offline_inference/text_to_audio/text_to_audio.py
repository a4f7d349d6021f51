"""Text-to-audio with the offline API (Stable Audio Open).

    python examples/offline_inference/text_to_audio/text_to_audio.py --model stabilityai/stable-audio-open-1.0 \
        --prompt "a 128 BPM techno drum loop" --audio-end-in-s 10 --seed 0 --output loop.wav

    # two prompts in one batch, a negative prompt, FLAC output (needs: pip install soundfile)
    python examples/offline_inference/text_to_audio/text_to_audio.py --model stabilityai/stable-audio-open-1.0 \
        --prompt "rain on a tin roof" --prompt "birdsong at dawn" --negative-prompt "low quality" --output clip.flac

    # CFG branches on 2 GPUs
    python examples/offline_inference/text_to_audio/text_to_audio.py --model ... --cfg-parallel-size 2

Stable Audio always generates its whole window (47.55 s for stable-audio-open-1.0) and cuts the clip
[--audio-start-in-s, --audio-end-in-s] from it; both seconds also condition the model. Without
--model it builds a tiny random-weight checkpoint first (noise, 1 s at 60 Hz, runs on CPU in seconds).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.audio_io import audio_format_for_path, write_audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny Stable Audio)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--audio-start-in-s", type=float, default=None, help="clip start (default 0)")
    parser.add_argument("--audio-end-in-s", type=float, default=None, help="clip end (default: the whole window)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 100)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale, > 1 turns CFG on (default 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parallel = parser.add_argument_group("parallelism (one process per GPU; see docs/parallelism.md)")
    for flag in ("tensor-parallel-size", "cfg-parallel-size"):
        parallel.add_argument(f"--{flag}", type=int, default=1)
    parser.add_argument("--output", default="text_to_audio.wav", help=".wav, or .flac with soundfile installed")
    args = parser.parse_args()
    audio_format_for_path(args.output)  # refuse an unsupported extension before loading anything

    model, tiny = args.model, args.model is None
    if tiny:
        from diffserve.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint("stable-audio", tempfile.mkdtemp(prefix="tiny-stable-audio-"))
    prompts = args.prompt or ["a 128 BPM techno drum loop"]
    params = OmniDiffusionSamplingParams(
        audio_start_in_s=args.audio_start_in_s,
        audio_end_in_s=args.audio_end_in_s,
        num_inference_steps=args.steps or (4 if tiny else None),
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
    )
    with Omni(model=model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
              cfg_parallel_size=args.cfg_parallel_size) as omni:
        outputs = omni.generate(prompts, params)
    stem, ext = os.path.splitext(args.output)
    for i, out in enumerate(outputs):
        path = args.output if i == 0 else f"{stem}_{i}{ext}"
        clip = out.audio[0]  # float32 [channels, samples]
        write_audio(path, clip, out.sample_rate)
        timings = ", ".join(f"{k}={v:.3f}" for k, v in out.metrics.items() if k.endswith("_s"))
        print(f"{path}: {clip.shape[1] / out.sample_rate:.2f} s, {clip.shape[0]} channel(s) at {out.sample_rate} Hz, "
              f"seed {out.seed}; {timings}")


if __name__ == "__main__":
    main()
