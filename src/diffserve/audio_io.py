"""Encoding generated audio into files (WAV, FLAC) and decoding them back.

Shared by the CLI and the HTTP server. A clip is float audio [channels, samples] in [-1, 1] (what
audio pipelines put in `DiffusionOutput.audio`, one array per clip); files hold 16-bit PCM, so
samples are clipped to [-1, 1] and rounded to 1/32767. WAV uses the standard library; FLAC needs
the optional `soundfile` package (pip install 'diffserve[audio]').
"""

from __future__ import annotations

import importlib.util
import io
import os
import wave
from typing import Any

import numpy as np

PCM_SCALE = 32767


def supported_audio_formats() -> tuple[str, ...]:
    """The formats this installation can write: wav, and flac when soundfile is installed."""
    return ("wav", "flac") if importlib.util.find_spec("soundfile") is not None else ("wav",)


def check_audio_format(fmt: str) -> str:
    """`fmt` (lower-cased) if it can be written here, else ValueError listing what can."""
    fmt = fmt.lower()
    supported = supported_audio_formats()
    if fmt not in supported:
        hint = " (flac needs the soundfile package: pip install soundfile)" if fmt == "flac" else ""
        raise ValueError(f"audio format {fmt!r} is not supported{hint}; supported: {', '.join(supported)}")
    return fmt


def audio_format_for_path(path: str) -> str:
    """The audio format a file name asks for (by its extension), or ValueError listing the supported ones."""
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    supported = supported_audio_formats()
    if ext not in supported:
        raise ValueError(
            f"cannot write audio output to {path!r}: the file name must end in "
            f"{', '.join('.' + f for f in supported)}"
            + ("" if "flac" in supported else " (.flac needs the soundfile package)")
        )
    return ext


def to_pcm16(audio: Any) -> np.ndarray:
    """Float audio [channels, samples] (or [samples]: mono) -> int16 [samples, channels]."""
    if hasattr(audio, "detach"):  # a torch tensor
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise ValueError(f"audio must have shape [channels, samples] with samples > 0, got {tuple(audio.shape)}")
    return np.ascontiguousarray((np.clip(audio, -1.0, 1.0) * PCM_SCALE).round().astype("<i2").T)


def _check_sample_rate(sample_rate: Any) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    return int(sample_rate)


def encode_wav(audio: Any, sample_rate: int) -> bytes:
    """Float audio [channels, samples] in [-1, 1] -> 16-bit PCM WAV bytes."""
    sample_rate = _check_sample_rate(sample_rate)
    pcm = to_pcm16(audio)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(pcm.shape[1])
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    return buffer.getvalue()


def encode_flac(audio: Any, sample_rate: int) -> bytes:
    """Float audio [channels, samples] in [-1, 1] -> 16-bit FLAC bytes (lossless for 16-bit PCM)."""
    check_audio_format("flac")
    import soundfile

    sample_rate = _check_sample_rate(sample_rate)
    buffer = io.BytesIO()
    # int16 in, so soundfile stores exactly these samples (no float conversion of its own).
    soundfile.write(buffer, to_pcm16(audio), sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def encode_audio(audio: Any, sample_rate: int, fmt: str = "wav") -> bytes:
    """Encode one clip as `fmt` (see supported_audio_formats())."""
    fmt = check_audio_format(fmt)
    return encode_wav(audio, sample_rate) if fmt == "wav" else encode_flac(audio, sample_rate)


def write_audio(path: str, audio: Any, sample_rate: int) -> None:
    """Write one clip to `path` in the format its extension names (.wav, or .flac with soundfile)."""
    data = encode_audio(audio, sample_rate, audio_format_for_path(path))
    with open(path, "wb") as f:
        f.write(data)


def decode_audio(data: bytes | str) -> tuple[np.ndarray, int]:
    """Decode a 16-bit WAV or FLAC file (bytes or a path) into (float32 [channels, samples] in [-1, 1],
    sample rate)."""
    if isinstance(data, str):
        with open(data, "rb") as f:
            data = f.read()
    if data[:4] == b"fLaC":
        check_audio_format("flac")
        import soundfile

        pcm, sample_rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
    else:
        with wave.open(io.BytesIO(data), "rb") as f:
            if f.getsampwidth() != 2:
                raise ValueError(f"only 16-bit PCM WAV is supported, got {8 * f.getsampwidth()}-bit samples")
            sample_rate, channels = f.getframerate(), f.getnchannels()
            pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").reshape(-1, channels)
    return (pcm.T.astype(np.float32) / PCM_SCALE), int(sample_rate)
