"""The online-serving examples run against a real server."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

from diffserve.audio_io import decode_audio
from diffserve.media import decode_video

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "online_serving"


def test_image_client_example(flux_server, tmp_path):
    out = tmp_path / "served.png"
    run = subprocess.run([sys.executable, str(EXAMPLES / "text_to_image/openai_client.py"), "--url",
                          f"{flux_server.url}/v1", "--size", "32x32", "--steps", "2", "--output", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (32, 32) and (tmp_path / "served_1.png").exists()


def test_video_job_example(start_server, tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint("wan2.1-t2v"), "--jobs-dir", str(tmp_path / "jobs"))
    out = tmp_path / "served.mp4"
    run = subprocess.run([sys.executable, str(EXAMPLES / "text_to_video/video_job.py"), "--url", f"{server.url}/v1",
                          "--size", "32x32", "--frames", "5", "--steps", "2", "--output", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr + run.stdout
    frames, _ = decode_video(out.read_bytes())
    assert frames.shape == (5, 32, 32, 3)


def test_audio_speech_example(start_server, tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint("stable-audio"))
    out = tmp_path / "served.wav"
    run = subprocess.run([sys.executable, str(EXAMPLES / "text_to_audio/openai_speech.py"), "--url", f"{server.url}/v1",
                          "--seconds", "0.5", "--steps", "2", "--output", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr + run.stdout
    audio, rate = decode_audio(out.read_bytes())
    assert rate == 60 and audio.shape == (2, 30)


def test_image_edit_example(start_server, tiny_checkpoint, tmp_path):
    from diffserve.testing.conformance import sample_image as picture

    server = start_server(tiny_checkpoint("qwen-image-edit-plus"))
    for i, size in enumerate([(64, 48), (48, 64)]):
        picture(*size, i).save(tmp_path / f"{i}.png")
    out = tmp_path / "edited.png"
    run = subprocess.run([sys.executable, str(EXAMPLES / "image_edit/openai_edit.py"), "--url", f"{server.url}/v1",
                          "--image", str(tmp_path / "0.png"), "--image", str(tmp_path / "1.png"), "--size", "128x96",
                          "--steps", "2", "--negative-prompt", " ", "--output", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr + run.stdout
    assert Image.open(out).size == (128, 96)
