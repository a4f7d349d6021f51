"""`diffserve generate` with video models: MP4 output that decodes back to what was asked for."""

import subprocess
import sys

import numpy as np
import pytest

from diffserve.entrypoints.cli import main
from diffserve.media import decode_video, encode_mp4
from diffserve.testing.conformance import wan_test_image


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffserve.entrypoints.cli", *args], capture_output=True, text=True)


def test_text_to_video_mp4_has_the_requested_frames_size_and_fps(tiny_checkpoint, tmp_path):
    out = tmp_path / "cat.mp4"
    result = run_cli("generate", "--model", tiny_checkpoint("wan2.1-t2v"), "a cat surfing", "-o", str(out),
                     "--num-frames", "5", "--height", "32", "--width", "48", "--steps", "1", "--fps", "8",
                     "--seed", "3", "--max-sequence-length", "16", "--disable-progress-bar")
    assert result.returncode == 0, result.stderr
    assert "seed 3" in result.stdout
    frames, fps = decode_video(out.read_bytes())
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
    assert fps == 8


def test_image_to_video_with_image_flag_and_model_fps(tiny_checkpoint, tmp_path):
    image = tmp_path / "first.png"
    wan_test_image(0).save(image)
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model", tiny_checkpoint("wan2.2-i2v"), "the cat walks", "--image", str(image),
                 "-o", str(out), "--num-frames", "5", "--height", "48", "--width", "32", "--steps", "2",
                 "--guidance-scale", "3", "--guidance-scale-2", "2", "--max-sequence-length", "16",
                 "--num-outputs", "2", "--disable-progress-bar"]) == 0
    for path in (tmp_path / "clip.mp4", tmp_path / "clip_1.mp4"):
        frames, fps = decode_video(str(path))
        assert frames.shape == (5, 48, 32, 3)
        assert fps == 16  # Wan's default frame rate


def test_invalid_video_inputs_are_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("wan2.1-t2v")
    assert main(["generate", "--model", path, "x", "--num-frames", "8", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: num_frames=8 is not supported by WanPipeline: it must be 4k+1" in err and "Traceback" not in err
    assert main(["generate", "--model", path, "x", "--image", str(tmp_path / "missing.png")]) == 2
    assert "cannot read --image" in capsys.readouterr().err


def test_help_lists_video_flags():
    gen_help = run_cli("generate", "--help").stdout
    for flag in ("--num-frames", "--fps", "--image", "--guidance-scale-2"):
        assert flag in gen_help


@pytest.mark.parametrize("height, width", [(32, 48), (31, 47)])
def test_encode_mp4_round_trip(height, width):
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, None, :, None]
    frames = np.broadcast_to(ramp, (4, height, width, 3)).astype(np.uint8)
    decoded, fps = decode_video(encode_mp4(frames, fps=24))
    assert decoded.shape == frames.shape and fps == 24
    assert np.abs(decoded.astype(int) - frames).max() <= 8  # lossy, but close


def test_encode_mp4_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \[frames, height, width, 3\]"):
        encode_mp4(np.zeros((4, 8, 8)), fps=16)
    with pytest.raises(ValueError, match="fps must be a positive number"):
        encode_mp4(np.zeros((1, 8, 8, 3), dtype=np.uint8), fps=0)
