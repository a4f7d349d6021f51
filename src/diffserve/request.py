"""What a user asks for and what the engine gives back."""

from __future__ import annotations

import dataclasses
import math
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from diffserve.config import check_known_keys

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**63 - 1


def _check_optional_positive(name: str, value: Any, kind: type = int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _checked_lora(lora: Any) -> dict[str, float] | None:
    """A copy of {adapter name: finite scale}; {} is None (no adapter)."""
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise ValueError(f"lora must be a dict {{adapter name: scale}}, got {lora!r}")
    for name, scale in lora.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"lora adapter names must be non-empty strings, got {name!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"lora scale of {name!r} must be a finite number, got {scale!r}")
    return dict(lora) or None


@dataclass
class OmniDiffusionSamplingParams:
    """Generation settings shared by every prompt of one request.

    A field left at None takes the model's default (e.g. FLUX.1-dev: 1024x1024, 28 steps,
    guidance 3.5). `seed` seeds a CPU generator per prompt, so a seeded request reproduces the
    diffusers pipeline called with `torch.Generator("cpu").manual_seed(seed)`.
    """

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    # Distilled guidance (FLUX guidance embedding) or classic CFG scale, per the model.
    guidance_scale: float | None = None
    # True classifier-free guidance with a negative prompt; > 1 turns it on. None: the model's default,
    # which applies only when a negative prompt is given (Qwen-Image: 4.0; FLUX: none, so no CFG).
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_outputs_per_prompt: int = 1
    max_sequence_length: int | None = None
    output_type: str = "pil"
    # Video / audio models.
    num_frames: int | None = None
    fps: int | None = None
    # Audio models: the clip runs from audio_start_in_s to audio_end_in_s (seconds). None: the model's
    # defaults (Stable Audio: 0 and its longest clip).
    audio_start_in_s: float | None = None
    audio_end_in_s: float | None = None
    guidance_scale_2: float | None = None
    # Image-to-image: how much of the input image is re-noised (1.0: all of it). None: model default.
    strength: float | None = None
    # Image editing (FLUX.1 Kontext) without height/width: the output keeps the input image's aspect
    # ratio at about this many pixels. None: model default (1024 * 1024).
    max_area: int | None = None
    # Image editing (FLUX.1 Kontext): True resizes each input image to the model's preferred size
    # nearest its aspect ratio; False keeps its own size, rounded down to the size multiple. None:
    # model default (True).
    auto_resize: bool | None = None
    # Skip-layer guidance (SD3 / SD3.5, with CFG): on the steps i with start < i / steps < stop, the
    # prediction is pushed away from one made with these transformer blocks skipped, by `scale`.
    skip_guidance_layers: tuple[int, ...] | None = None
    skip_layer_guidance_scale: float | None = None
    skip_layer_guidance_start: float | None = None
    skip_layer_guidance_stop: float | None = None
    # LoRA adapters loaded by the engine (lora_modules) to apply, {name: scale}; several stack. Scale
    # 0 is the same as leaving the adapter out. None: no adapter.
    lora: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.lora = _checked_lora(self.lora)
        for name in ("height", "width", "num_inference_steps", "max_sequence_length", "num_frames", "fps", "max_area"):
            _check_optional_positive(name, getattr(self, name))
        for name in ("guidance_scale", "guidance_scale_2", "true_cfg_scale", "audio_start_in_s", "audio_end_in_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.strength is not None and (
            isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not 0 < self.strength <= 1
        ):
            raise ValueError(f"strength must be a number in (0, 1], got {self.strength!r}")
        if self.auto_resize is not None and not isinstance(self.auto_resize, bool):
            raise ValueError(f"auto_resize must be True or False, got {self.auto_resize!r}")
        self._check_skip_layer_guidance()
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63-1], got {self.seed!r}")
        _check_optional_positive("num_outputs_per_prompt", self.num_outputs_per_prompt)
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")

    def _check_skip_layer_guidance(self) -> None:
        layers = self.skip_guidance_layers
        if layers is not None:
            if (
                not isinstance(layers, (list, tuple))
                or not layers
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
            ):
                raise ValueError(f"skip_guidance_layers must be a non-empty list of block indices >= 0, got {layers!r}")
            # A tuple: sampling parameters are part of the (hashable) batch key.
            self.skip_guidance_layers = tuple(layers)
        for name in ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        start, stop = self.skip_layer_guidance_start, self.skip_layer_guidance_stop
        for name, value in (("skip_layer_guidance_start", start), ("skip_layer_guidance_stop", stop)):
            if value is not None and value > 1:
                raise ValueError(f"{name} is a fraction of the denoise steps in [0, 1], got {value!r}")
        if start is not None and stop is not None and not start < stop:
            raise ValueError(f"skip_layer_guidance_start ({start}) must be below skip_layer_guidance_stop ({stop})")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "OmniDiffusionSamplingParams":
        check_known_keys("sampling parameter", values, [f.name for f in dataclasses.fields(cls)])
        return cls(**values)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (seed and negative prompt are per prompt)."""
        return tuple(
            getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("seed", "negative_prompt")
        )


@dataclass
class PromptInput:
    """One prompt of a request, with what belongs to it alone."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    images: list[Any] | None = None
    audio: Any | None = None

    @classmethod
    def from_user(cls, prompt: Any, params: OmniDiffusionSamplingParams) -> "PromptInput":
        """Accept a string or a dict {"prompt", "negative_prompt", "image"/"images", "seed"}."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict):
            raise ValueError(
                f"a prompt must be a string or a dict with a 'prompt' key, got {type(prompt).__name__}"
            )
        check_known_keys("prompt", prompt, ["prompt", "negative_prompt", "image", "images", "audio", "seed"])
        text = prompt.get("prompt")
        if not isinstance(text, str):
            raise ValueError(f"'prompt' must be a string, got {type(text).__name__}")
        images = prompt.get("images", prompt.get("image"))
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        negative = prompt.get("negative_prompt", params.negative_prompt)
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"'negative_prompt' must be a string, got {type(negative).__name__}")
        seed = prompt.get("seed", params.seed)
        if seed is None:
            seed = secrets.randbelow(2**32)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63-1], got {seed!r}")
        return cls(
            prompt=text,
            seed=seed,
            negative_prompt=negative,
            images=list(images) if images is not None else None,
            audio=prompt.get("audio"),
        )


@dataclass
class OmniDiffusionRequest:
    """One pipeline call: one or more prompts sharing one set of sampling parameters."""

    prompts: list[PromptInput]
    sampling_params: OmniDiffusionSamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def batch_size(self) -> int:
        """Number of outputs the pipeline produces: prompts x outputs per prompt."""
        return len(self.prompts) * self.sampling_params.num_outputs_per_prompt

    @property
    def prompt_texts(self) -> list[str]:
        return [p.prompt for p in self.prompts]

    @property
    def negative_prompt_texts(self) -> list[str | None]:
        return [p.negative_prompt for p in self.prompts]

    @property
    def seeds(self) -> list[int]:
        return [p.seed for p in self.prompts]


@dataclass
class DiffusionOutput:
    """The result of one request (or, inside the engine, of one pipeline call).

    A pipeline returns `DiffusionOutput(output=...)` with its raw tensor; the registered post-process
    function turns that into `images` (PIL, np or torch by output_type), `frames` or `audio`.
    """

    output: Any = None
    images: list[Any] | Any | None = None
    frames: list[Any] | None = None
    audio: Any | None = None
    sample_rate: int | None = None
    request_id: str | None = None
    prompt: str | None = None
    seed: int | None = None
    error: str | None = None
    # "invalid_request" for what the caller must fix, "internal" for engine failures.
    error_type: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None
