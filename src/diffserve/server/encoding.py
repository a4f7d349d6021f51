"""Image bytes in and out of the server (audio: diffserve.audio_io, shared with the CLI)."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from diffserve.server.errors import APIError

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MAX_INPUT_PIXELS = 4096 * 4096


def encode_image(image: Image.Image, output_format: str = "png", compression: int | None = None) -> bytes:
    fmt = IMAGE_FORMATS[output_format]
    buffer = io.BytesIO()
    kwargs = {}
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = 100 - compression if compression is not None else 95
        image = image.convert("RGB")
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# The upload formats accepted (Pillow's names), as the error messages say.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, param: str = "image") -> Image.Image:
    """An uploaded image, as decoded (its mode, size and count are checked against the model at
    admission, which converts it to RGB); anything that is not a readable PNG, JPEG or WebP of sane
    size is a 400."""
    if not data:
        raise APIError(400, f"{param} is empty", param)
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in INPUT_FORMATS:
            raise APIError(400, f"{param} is a {image.format} image; send png, jpeg or webp", param)
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise APIError(400, f"{param} is {image.width}x{image.height}; at most {MAX_INPUT_PIXELS} pixels", param)
        image.load()
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise APIError(400, f"{param} is not a readable image (png, jpeg or webp): {exc}", param) from None
    return image


def decode_base64_image(data: str, param: str = "image") -> Image.Image:
    if "," in data and data.startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", param) from None
    return decode_image(raw, param)
