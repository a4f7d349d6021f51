"""What a model takes and makes: the one declaration the engine validates requests against.

Every pipeline returns a `SamplingSpec` from `sampling_spec()`, built from its loaded configuration
(FLUX.1-schnell has no guidance embedding, so it takes no `guidance_scale`; a Wan2.1 checkpoint has
one expert, so no `guidance_scale_2`). The engine fetches it once from rank 0 and, before admitting
a request, rejects every parameter the model does not use, fills the defaults, checks sizes, and
derives the batch key from the resolved parameters (diffserve.engine.admission). Pipelines then
read fully resolved sampling parameters and keep only what is their own.

No torch here: the spec crosses process boundaries and the server reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

MODALITIES = ("image", "video", "audio")
# How classifier-free guidance is switched on, the one rule every pipeline follows:
# - "guidance": guidance_scale > 1 turns it on; the negative branch is each prompt's negative
#   prompt or "" (SD3, Wan, Stable Audio, the demo model);
# - "true_cfg": true_cfg_scale > 1 together with a negative prompt turns it on; guidance_scale, if
#   the model takes it, is a distilled embedding (FLUX, Qwen-Image).
CFG_MODES = (None, "guidance", "true_cfg")

# model_index.json key whose {parameter: value} replace the pipeline's defaults for that checkpoint
# (tiny test checkpoints run small by default; the demo model stores the settings it was tuned for).
DEFAULTS_KEY = "_diffserve_defaults"

# Parameters every model takes: they do not change what the model computes per sample.
UNIVERSAL_PARAMS = frozenset({"seed", "num_outputs_per_prompt", "output_type"})


# Input images in these modes hold more than 8 bits per channel: converting them to RGB would clip
# them, so they are refused rather than silently changed.
HIGH_BIT_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def size_at_area(width: int, height: int, area: int, rounding: int | None = None) -> tuple[int, int]:
    """(width, height) of about `area` pixels at the aspect ratio of a width x height image.

    rounding None: each side to the nearest pixel (FLUX.1 Kontext's reference); N: the width to the
    nearest multiple of N and the height, derived from it, too (Qwen-Image-Edit's reference, N = 32).
    """
    ratio = width / height
    if rounding is None:
        return round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
    fit_width = math.sqrt(area * ratio)
    fit_height = fit_width / ratio
    return round(fit_width / rounding) * rounding, round(fit_height / rounding) * rounding


@dataclass(frozen=True)
class ImageInputSpec:
    """Input images, per prompt.

    `required`: text-to-X is not possible (image-to-video); otherwise a request may bring images or
    not, but all its prompts alike. `params` are sampling parameters used only with input images
    (image-to-image `strength`). `size_from_image`: with no height/width given, the output takes the
    first input image's size, rounded down to the size multiple. `size_from_aspect_ratio`: instead,
    the output keeps that image's aspect ratio at about `max_area` pixels (the model then takes the
    parameter `max_area`). `resized_to_output`: every input is resized to the output size before use,
    so inputs of different sizes can share a batch. `preferred_sizes`: the (width, height) sizes the
    model was trained at; each input is resized to the one nearest its aspect ratio, or, when a request
    sets `auto_resize=False`, keeps its own size rounded down to the size multiple (FLUX.1 Kontext).
    Inputs that end up the same size share a batch; with neither rule declared, only equal sizes do.
    `tokens_in_sequence`: the inputs' latent tokens join the denoiser's sequence (an editing model's
    reference tokens), so the work estimate counts them.

    `size_image`: which input image sizes the output (0: the first, -1: the last, as Qwen-Image-Edit-
    Plus). `area_rounding`: how sides fitted to an area are rounded (see `size_at_area`), for the
    output (size_from_aspect_ratio) and for `input_area`. `input_area`: each input is resized to about
    that many pixels at its own aspect ratio before use (Qwen-Image-Edit's reference images: 1024 *
    1024); inputs resized to one size share a batch.

    Every input image is converted to RGB (a high-bit-depth one is refused) and must have sides of
    at most the model's `max_side` and at most `max_input_pixels` pixels.
    """

    max_per_prompt: int = 1
    required: bool = False
    params: frozenset[str] = frozenset()
    size_from_image: bool = False
    size_from_aspect_ratio: bool = False
    resized_to_output: bool = False
    # size_from_image keeps the image's aspect ratio but at most this many output pixels, so a huge
    # upload does not make a huge (and very slow) default output.
    default_max_pixels: int = 1024 * 1024
    preferred_sizes: tuple[tuple[int, int], ...] = ()
    tokens_in_sequence: bool = False
    size_image: int = 0
    area_rounding: int | None = None
    input_area: int | None = None
    max_input_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if self.input_area is not None and (self.resized_to_output or self.preferred_sizes):
            raise ValueError("inputs are resized to one rule: input_area, resized_to_output or preferred_sizes")
        if self.size_from_aspect_ratio and not self.size_from_image:
            raise ValueError("size_from_aspect_ratio needs size_from_image")
        if self.resized_to_output and self.preferred_sizes:
            raise ValueError("inputs are resized either to the output size or to preferred_sizes, not both")
        if any(len(s) != 2 or min(s) <= 0 for s in self.preferred_sizes):
            raise ValueError(
                f"preferred_sizes must be (width, height) pairs of positive sides, got {self.preferred_sizes}"
            )


@dataclass(frozen=True)
class SamplingSpec:
    modality: str  # "image" | "video" | "audio"
    # Optional sampling parameters the model uses (besides UNIVERSAL_PARAMS); any other a user sets
    # is an error naming it.
    params: frozenset[str]
    # The value each parameter takes when the user gives none. A parameter in `params` without a
    # default is left None for the pipeline to derive (e.g. Wan2.2's guidance_scale_2 follows
    # guidance_scale).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    cfg: str | None = None
    images: ImageInputSpec | None = None
    # Output sides must be multiples of size_multiple within [min_side, max_side].
    size_multiple: int = 1
    min_side: int | None = None  # None: size_multiple
    max_side: int = 4096
    # num_frames must be frames_multiple * k + 1 (video VAEs compress frames after the first).
    frames_multiple: int | None = None
    # The text encoder's token limit (max_sequence_length may not exceed it).
    max_sequence_length: int | None = None
    # Latent tokens per sample when they do not follow the output size (audio); for the work estimate.
    fixed_tokens: int | None = None
    # Audio models: the longest clip. A request's [audio_start_in_s, audio_end_in_s] must lie within
    # [0, max_audio_seconds], start before end (the model generates this window and crops the clip).
    max_audio_seconds: float | None = None
    # Parameters that only tune another one, each with the parameter it needs (SD3:
    # skip_layer_guidance_scale -> skip_guidance_layers). Set without it, one is an error, not ignored.
    refines: Mapping[str, str] = field(default_factory=dict)
    # Parameters used only while classifier-free guidance runs (SD3's skip-layer guidance corrects the
    # guided prediction). They take no default, so a request without CFG carries none.
    cfg_only_params: frozenset[str] = frozenset()
    # Parameters holding indices (of transformer blocks, say), each with the number of valid indices.
    index_limits: Mapping[str, int] = field(default_factory=dict)
    # Parameters the model takes but this engine configuration cannot run, each with the reason the
    # admission error gives (a step cache cannot follow skip-layer guidance's extra transformer call).
    unavailable: Mapping[str, str] = field(default_factory=dict)
    # Names of the LoRA adapters the engine loaded (the parameter `lora` picks among them); filled
    # by DiffusionPipelineBase.spec, which then adds `lora` to `params`.
    lora_adapters: frozenset[str] = frozenset()
    # The pipeline class, for messages (filled by DiffusionPipelineBase.spec).
    model: str = ""

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.cfg not in CFG_MODES:
            raise ValueError(f"cfg must be one of {CFG_MODES}, got {self.cfg!r}")
        object.__setattr__(self, "params", frozenset(self.params))
        object.__setattr__(self, "cfg_only_params", frozenset(self.cfg_only_params))
        object.__setattr__(self, "lora_adapters", frozenset(self.lora_adapters))
        if self.lora_adapters and "lora" not in self.params:
            raise ValueError(f"{self.model}: LoRA adapters are loaded but the parameter lora is not taken")
        extra = set(self.defaults) - self.accepted_params
        if extra:
            raise ValueError(f"{self.model}: defaults for parameters it does not take: {sorted(extra)}")
        if self.images is not None and self.images.size_from_aspect_ratio and "max_area" not in self.defaults:
            raise ValueError(f"{self.model}: size_from_aspect_ratio needs the parameter max_area with a default")
        named = {*self.refines, *self.refines.values(), *self.cfg_only_params, *self.index_limits, *self.unavailable}
        if named - self.accepted_params:
            raise ValueError(f"{self.model}: rules for parameters it does not take: {sorted(named - self.accepted_params)}")
        if self.cfg_only_params and self.cfg is None:
            raise ValueError(f"{self.model}: cfg_only_params {sorted(self.cfg_only_params)} without a CFG mode")
        defaulted = self.cfg_only_params & set(self.defaults)
        if defaulted:
            raise ValueError(f"{self.model}: cfg_only_params {sorted(defaulted)} must not have defaults")

    @property
    def accepted_params(self) -> frozenset[str]:
        image_params = self.images.params if self.images is not None else frozenset()
        cfg_params = {"negative_prompt"} if self.cfg is not None else set()
        return UNIVERSAL_PARAMS | self.params | image_params | cfg_params

    @property
    def takes_images(self) -> bool:
        return self.images is not None

    @property
    def smallest_side(self) -> int:
        return self.min_side or self.size_multiple

    def input_image_size(self, size: tuple[int, int], sp: Any) -> tuple[int, int] | None:
        """The (width, height) at which the model uses an input image of `size` (width, height), for a
        request's resolved sampling parameters `sp`; None where the model declares no rule."""
        images = self.images
        if images.resized_to_output:
            return sp.width, sp.height
        if images.input_area is not None:
            return size_at_area(*size, images.input_area, images.area_rounding)
        if not images.preferred_sizes:
            return None
        m = self.size_multiple
        width, height = (side // m * m for side in size)
        # An image smaller than the size multiple has no aspect ratio to match; admission refuses it.
        if sp.auto_resize is not False and width and height:
            # The preferred size nearest in aspect ratio; on a tie the narrower one, as the reference
            # (diffusers' FluxKontextPipeline) picks it.
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in images.preferred_sizes)
        return width // m * m, height // m * m

    def replace(self, **changes: Any) -> "SamplingSpec":
        return dataclasses.replace(self, **changes)
