"""Encoding generated media into files (MP4 video through PyAV; animated GIF/WebP through Pillow) and
decoding them back.

Shared by the CLI and the HTTP server: a video is a uint8 array [F, H, W, 3] (what video pipelines
put in `DiffusionOutput.frames` by default), encoded as H.264 in an MP4 container at the requested
frame rate.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from typing import Any

import numpy as np


def _import_av():
    try:
        import av
    except ImportError as exc:  # a dependency of diffserve; only a broken install lacks it
        raise ImportError("MP4 encoding needs PyAV: pip install av") from exc
    return av


def as_uint8_frames(frames: Any) -> np.ndarray:
    """A video as a contiguous uint8 array [F, H, W, 3]; float input is taken as [0, 1]."""
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"a video must have shape [frames, height, width, 3], got {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError("a video needs at least one frame")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"video frames must be uint8 or float in [0, 1], got dtype {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def encode_mp4(frames: Any, fps: int | float, crf: int = 18) -> bytes:
    """Encode a video (uint8 [F, H, W, 3], or float in [0, 1]) as H.264 MP4 bytes at `fps`."""
    buffer = io.BytesIO()
    _encode_mp4(buffer, frames, fps, crf)
    return buffer.getvalue()


def _encode_mp4(target, frames: Any, fps: int | float, crf: int) -> None:
    """H.264 into `target` (a path or a file object), frame by frame.

    Even frame sizes use yuv420p, which every player decodes; odd sizes cannot be chroma-subsampled
    and use yuv444p instead. `crf` is x264's quality (0 lossless, 18 visually lossless, 23 default).
    """
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    av = _import_av()
    video = as_uint8_frames(frames)
    _, height, width, _ = video.shape
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        stream.options = {"crf": str(crf)}
        for image in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())  # flush the frames the encoder still holds


def write_mp4(path: str, frames: Any, fps: int | float, crf: int = 18) -> None:
    """Encode straight into the file (no whole video in memory)."""
    _encode_mp4(path, frames, fps, crf)


def decode_video(data: bytes | str) -> tuple[np.ndarray, float]:
    """Decode a video file (bytes or a path) into (uint8 frames [F, H, W, 3], frames per second)."""
    av = _import_av()
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with av.open(source) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError("the video has no frames")
    return np.stack(frames), fps


def write_animation(path: str, frames: Any, fps: int | float) -> None:
    """An animated GIF or WebP (by the path's extension) through Pillow, looping forever."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in as_uint8_frames(frames)]
    duration_ms = max(1, round(1000 / fps))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


# What each output modality can be written as, by file extension.
OUTPUT_EXTENSIONS = {
    "image": (".png", ".jpg", ".jpeg", ".webp"),
    "video": (".mp4", ".gif", ".webp"),
}


def check_output_path(path: str, modality: str) -> None:
    """A ValueError naming the supported extensions if `path` cannot hold a `modality` output."""
    if modality == "audio":  # which formats depends on what is installed (FLAC needs soundfile)
        from diffserve.audio_io import audio_format_for_path

        audio_format_for_path(path)
        return
    ext = os.path.splitext(path)[1].lower()
    allowed = OUTPUT_EXTENSIONS[modality]
    if ext not in allowed:
        raise ValueError(
            f"cannot write {modality} output to {path!r}: the file name must end in {', '.join(allowed)}"
        )


def write_video(path: str, frames: Any, fps: int | float) -> None:
    """MP4 (H.264) or an animated GIF/WebP, by the path's extension."""
    check_output_path(path, "video")
    if path.lower().endswith(".mp4"):
        write_mp4(path, frames, fps)
    else:
        write_animation(path, frames, fps)
