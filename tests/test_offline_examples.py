"""The offline-inference examples run as users run them: a fresh interpreter, no arguments (the demo
model or a tiny checkpoint on the CPU), and the text-to-video one with its multi-GPU flags (CPU worker
processes). The text-to-audio one must write a WAV that decodes to the tiny model's whole clip."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "offline_inference"
CASES = [
    ("text_to_image/text_to_image.py", [], "text_to_image.png"),
    ("text_to_image/cache_acceleration.py", ["--steps", "8"], "cache_acceleration_tea_cache.png"),
    ("text_to_video/text_to_video.py", [], "text_to_video.mp4"),
    ("image_to_video/image_to_video.py", [], "image_to_video.mp4"),
    ("image_edit/flux_kontext.py", [], "flux_kontext.png"),
    ("image_edit/qwen_image_edit.py", ["--negative-prompt", " "], "qwen_image_edit.png"),
    ("text_to_audio/text_to_audio.py", [], "text_to_audio.wav"),
    ("lora/lora_adapters.py", [], "lora_stacked.png"),
    ("diffusers_adapter/any_diffusers_pipeline.py", ["--steps", "2"], "any_diffusers_pipeline.png"),
    # 64x80 pixels, 9 frames: 60 video tokens, which split over 2 ring ranks.
    pytest.param("text_to_video/text_to_video.py",
                 ["--ring-degree", "2", "--vae-patch-parallel-size", "2", "--height", "64"], "text_to_video.mp4",
                 marks=pytest.mark.slow),  # 4 processes; the parallel modes run in tests/distributed
]


@pytest.mark.parametrize("script, flags, output", CASES,
                         ids=["t2i", "cache", "t2v", "i2v", "flux-kontext", "qwen-image-edit", "t2a", "lora",
                              "diffusers-adapter",
                              "t2v-ring2-vae2"])
def test_example_runs_and_writes_its_output(tmp_path, script, flags, output):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *flags], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = tmp_path / output
    assert written.exists() and written.stat().st_size > 0, (list(tmp_path.iterdir()), result.stdout[-2000:])
    if output.endswith(".wav"):
        from diffserve.audio_io import decode_audio

        audio, rate = decode_audio(str(written))
        assert rate == 60 and audio.shape == (2, 60)  # the tiny Stable Audio's whole 1 s, stereo


def test_text_to_image_example_runs_sd3_with_skip_layer_guidance(tiny_checkpoint, tmp_path):
    """The text-to-image example on a tiny SD3.5-medium (3 blocks; its small defaults: 32x32, 4 steps),
    with skip-layer guidance on block 1 over the steps 1 and 2 of 4 (the default window holds none)."""
    flags = ["--model", tiny_checkpoint("sd3.5-medium"), "--skip-guidance-layers", "1", "--skip-layer-guidance-scale",
             "2.0", "--skip-layer-guidance-stop", "0.6"]
    result = subprocess.run([sys.executable, str(EXAMPLES / "text_to_image/text_to_image.py"), *flags], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "text_to_image.png").stat().st_size > 0
