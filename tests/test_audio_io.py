"""Audio files: 16-bit WAV (standard library) and FLAC (soundfile, optional) decode back to the clip
within 16-bit rounding; what cannot be written is refused with the supported list."""

import importlib.util

import numpy as np
import pytest
import torch

from diffserve.audio_io import (
    PCM_SCALE,
    audio_format_for_path,
    decode_audio,
    encode_audio,
    encode_wav,
    supported_audio_formats,
    write_audio,
)

HAS_SOUNDFILE = importlib.util.find_spec("soundfile") is not None
# Rounding to the nearest 16-bit step, plus float32 slack.
PCM_ROUNDING = 0.5 / PCM_SCALE + 1e-7


def clip(channels=2, samples=441, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1.2, 1.2, size=(channels, samples))).astype(np.float32)  # some samples beyond [-1, 1]


def test_wav_round_trip_within_16_bit_rounding():
    audio = clip()
    decoded, rate = decode_audio(encode_wav(audio, 44100))
    assert rate == 44100 and decoded.shape == audio.shape and decoded.dtype == np.float32
    assert np.abs(decoded - np.clip(audio, -1, 1)).max() <= PCM_ROUNDING


def test_wav_takes_tensors_and_mono():
    audio = torch.linspace(-1, 1, 100)
    decoded, rate = decode_audio(encode_audio(audio, 16000, "wav"))
    assert rate == 16000 and decoded.shape == (1, 100)
    assert np.abs(decoded[0] - audio.numpy()).max() <= PCM_ROUNDING


@pytest.mark.skipif(not HAS_SOUNDFILE, reason="FLAC needs the optional soundfile package")
def test_flac_round_trip_holds_the_same_samples_as_wav(tmp_path):
    audio = clip(seed=1)
    path = str(tmp_path / "clip.flac")
    write_audio(path, audio, 48000)
    flac, rate = decode_audio(path)
    wav, _ = decode_audio(encode_wav(audio, 48000))
    assert rate == 48000 and np.array_equal(flac, wav)


def test_unsupported_formats_are_refused_with_the_supported_list(tmp_path):
    supported = supported_audio_formats()
    assert supported == (("wav", "flac") if HAS_SOUNDFILE else ("wav",))
    with pytest.raises(ValueError, match=r"cannot write audio output to 'loop.mp3': the file name must end in \.wav"):
        audio_format_for_path("loop.mp3")
    with pytest.raises(ValueError, match=r"audio format 'mp3' is not supported.*; supported: wav"):
        encode_audio(clip(), 44100, "mp3")
    if not HAS_SOUNDFILE:
        with pytest.raises(ValueError, match="flac needs the soundfile package"):
            write_audio(str(tmp_path / "x.flac"), clip(), 44100)
    assert audio_format_for_path("Loop.WAV") == "wav"


@pytest.mark.parametrize(
    "audio, rate, message",
    [
        (np.zeros((2, 0)), 44100, r"shape \[channels, samples\] with samples > 0, got \(2, 0\)"),
        (np.zeros((1, 2, 3)), 44100, r"shape \[channels, samples\]"),
        (np.zeros((2, 10)), 0, "sample_rate must be a positive integer, got 0"),
        (np.zeros((2, 10)), 44100.0, "sample_rate must be a positive integer"),
    ],
    ids=["empty", "3d", "zero_rate", "float_rate"],
)
def test_bad_clips_are_one_line_errors(audio, rate, message):
    with pytest.raises(ValueError, match=message):
        encode_wav(audio, rate)
