"""`diffserve generate` with an audio model: a WAV of the requested seconds that decodes back to the
generated samples, and output names it cannot write refused before generating."""

import subprocess
import sys

import numpy as np
import pytest

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.audio_io import PCM_SCALE, decode_audio
from diffserve.entrypoints.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")


def test_generate_writes_a_wav_of_the_generated_samples(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("stable-audio")
    out = tmp_path / "loop.wav"
    result = subprocess.run(
        [sys.executable, "-m", "diffserve.entrypoints.cli", "generate", "--model", path, "a drum loop",
         "--audio-start-in-s", "0.25", "--audio-end-in-s", "0.75", "-o", str(out), "--steps", "3", "--seed", "5",
         "--disable-progress-bar"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "seed 5" in result.stdout
    decoded, rate = decode_audio(out.read_bytes())
    assert rate == 60 and decoded.shape == (2, 30)  # 0.5 s of stereo at the tiny model's 60 Hz
    params = OmniDiffusionSamplingParams(audio_start_in_s=0.25, audio_end_in_s=0.75, num_inference_steps=3, seed=5)
    with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        (generated,) = omni.generate("a drum loop", params)[0].audio
    # 16-bit PCM: clipped to [-1, 1] and rounded to the nearest 1/32767.
    assert np.abs(decoded - np.clip(generated, -1, 1)).max() <= 0.5 / PCM_SCALE + 1e-7
    assert np.abs(generated).max() > 0.1  # a real signal, not silence


def test_several_outputs_and_default_name(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", tiny_checkpoint("stable-audio"), "rain", "--steps", "2",
                 "--num-outputs", "2", "--guidance-scale", "1", "--disable-progress-bar"]) == 0
    for name in ("output.wav", "output_1.wav"):
        decoded, rate = decode_audio(str(tmp_path / name))
        assert rate == 60 and decoded.shape == (2, 60)  # the default: the model's whole 1 s


def test_unsupported_extension_and_window_are_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("stable-audio")
    assert main(["generate", "--model", path, "rain", "-o", str(tmp_path / "rain.mp3"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write audio output to" in err and "the file name must end in .wav" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
    assert main(["generate", "--model", path, "rain", "--audio-end-in-s", "4", "--steps", "1"]) == 2
    assert "audio_end_in_s=4.0 is beyond StableAudioPipeline's longest clip of 1 s" in capsys.readouterr().err


def test_help_lists_audio_flags():
    gen_help = subprocess.run([sys.executable, "-m", "diffserve.entrypoints.cli", "generate", "--help"],
                              capture_output=True, text=True).stdout
    for flag in ("--audio-start-in-s", "--audio-end-in-s"):
        assert flag in gen_help
