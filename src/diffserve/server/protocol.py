"""Request bodies of the HTTP API (pydantic), strict about types and unknown fields.

Fields OpenAI defines but that have no meaning here (quality, style, user, ...) are accepted and
ignored, so the official client works unchanged; anything else unknown is a 400 that names it.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from diffserve.request import MAX_SEED

MAX_PROMPT_CHARS = 20000
MAX_STEPS = 1000
MAX_SIDE = 4096
SIZE_PATTERN = re.compile(r"([0-9]+)x([0-9]+)")  # ASCII digits only, matched whole


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_NUMBER_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _form_text(value: Any, info: ValidationInfo, pattern: re.Pattern, parse) -> Any:
    """Multipart forms carry text: a number field parses its ASCII digits there (and only there;
    JSON numbers must be numbers)."""
    if isinstance(value, str) and info.context and info.context.get("form"):
        if not pattern.fullmatch(value):
            raise ValueError(f"must be a number, got {value!r}")
        return parse(value)
    return value


def _number(value: Any, info: ValidationInfo) -> Any:
    value = _form_text(value, info, _NUMBER_TEXT, float)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {type(value).__name__}")
    return value


def _integer(value: Any, info: ValidationInfo) -> Any:
    value = _form_text(value, info, _INTEGER_TEXT, int)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"must be an integer, got {type(value).__name__}")
    return value


def _form_json(value: Any, info: ValidationInfo) -> Any:
    """An object field arrives as JSON text in a multipart form."""
    if isinstance(value, str) and info.context and info.context.get("form"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"must be a JSON object, got {value!r}") from None
    return value


Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integer)]


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """"WxH" -> (height, width); None or "auto" -> the model's default."""
    if size is None or size == "auto":
        return None, None
    match = SIZE_PATTERN.fullmatch(size)
    if not match:
        raise ValueError(f"size must look like '1024x768' (width x height) or 'auto', got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"size {size} is out of range: width and height must be between 1 and {MAX_SIDE}")
    return height, width


class GenerationExtensions(BaseModel):
    """diffserve's extensions to OpenAI's request bodies."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    num_inference_steps: Annotated[Integer, Field(ge=1, le=MAX_STEPS)] | None = None
    guidance_scale: Annotated[Number, Field(ge=0, le=100)] | None = None
    true_cfg_scale: Annotated[Number, Field(ge=0, le=100)] | None = None
    seed: Annotated[Integer, Field(ge=0, le=MAX_SEED)] | None = None
    # LoRA adapters the server loaded (--lora-modules) and their scales, {"name": scale}.
    lora: Annotated[dict[str, Number] | None, BeforeValidator(_form_json)] = None


class ImageGenerationRequest(GenerationExtensions):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    model: str | None = None
    n: Annotated[Integer, Field(ge=1)] = 1
    size: str | None = None
    response_format: str | None = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Annotated[Integer, Field(ge=0, le=100)] | None = None
    # Edits (image-to-image): how much of the input is re-noised, (0, 1]. None: the model's default.
    strength: Annotated[Number, Field(gt=0, le=1)] | None = None
    # OpenAI fields accepted for compatibility; they do not change the result.
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    input_fidelity: str | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value):
        parse_size(value)
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value):
        if value not in (None, "b64_json"):
            raise ValueError(f"only 'b64_json' is supported (images are returned inline), got {value!r}")
        return value


class VideoCreateRequest(GenerationExtensions):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    model: str | None = None
    seconds: str | Integer | None = None
    size: str | None = None
    num_frames: Annotated[Integer, Field(ge=1, le=1025)] | None = None
    fps: Annotated[Integer, Field(ge=1, le=120)] | None = None
    guidance_scale_2: Annotated[Number, Field(ge=0, le=100)] | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value):
        parse_size(value)
        return value

    @field_validator("seconds")
    @classmethod
    def _seconds(cls, value):
        if value is None:
            return value
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"seconds must be a number of seconds, got {value!r}") from None
        if not 0 < seconds <= 60:
            raise ValueError(f"seconds must be in (0, 60], got {value!r}")
        return value


class AudioClipFields(GenerationExtensions):
    """The clip window of audio requests: `seconds` long from `audio_start_in_s` (default 0), or up to
    `audio_end_in_s`; the model checks its own limits."""

    seconds: Annotated[Number, Field(gt=0, le=600)] | None = None
    audio_start_in_s: Annotated[Number, Field(ge=0, le=600)] | None = None
    audio_end_in_s: Annotated[Number, Field(gt=0, le=600)] | None = None
    response_format: str = "wav"

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value):
        from diffserve.audio_io import check_audio_format

        return check_audio_format(value)

    def clip_params(self) -> dict[str, Any]:
        if self.seconds is not None and self.audio_end_in_s is not None:
            raise ValueError("give seconds or audio_end_in_s, not both")
        end = self.audio_end_in_s
        if self.seconds is not None:
            end = (self.audio_start_in_s or 0.0) + self.seconds
        return {"audio_start_in_s": self.audio_start_in_s, "audio_end_in_s": end}


class AudioGenerationRequest(AudioClipFields):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    model: str | None = None


class SpeechRequest(AudioClipFields):
    """OpenAI's POST /v1/audio/speech body. A text-to-audio model has no voices: `voice` (which the
    official client always sends) is accepted and ignored; what would change the result but cannot be
    honoured (speed, instructions, SSE streaming) is refused."""

    input: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    model: str | None = None
    voice: str | dict[str, Any] | None = None
    instructions: str | None = None
    speed: Number | None = None
    stream_format: str | None = None

    @field_validator("speed")
    @classmethod
    def _speed(cls, value):
        if value is not None and value != 1:
            raise ValueError(f"only speed 1 is supported (the clip length is set by seconds), got {value!r}")
        return value

    @field_validator("instructions")
    @classmethod
    def _instructions(cls, value):
        if value:
            raise ValueError("instructions are not supported: describe the sound in input")
        return value

    @field_validator("stream_format")
    @classmethod
    def _stream_format(cls, value):
        if value not in (None, "audio"):
            raise ValueError(f"only stream_format 'audio' (the whole file in one response) is supported, got {value!r}")
        return value
