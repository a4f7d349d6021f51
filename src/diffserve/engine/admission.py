"""Admission: check a request against the model's SamplingSpec and resolve its parameters.

One path for `Omni`, the CLI and the server: a request the model cannot run is refused here, before
it is queued, with an `InvalidRequestError` naming the parameter; an admitted request carries fully
resolved sampling parameters (defaults filled), so the batch key and the pipeline see the same
values. The CFG rule lives here too (`cfg_enabled`), used by the scheduler and the pipelines alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffserve.models.spec import HIGH_BIT_DEPTH_MODES, UNIVERSAL_PARAMS, SamplingSpec, size_at_area
from diffserve.request import OmniDiffusionRequest, OmniDiffusionSamplingParams

# Never part of a batch key: per prompt (seed, negative prompt) or not about numerics.
_PER_PROMPT_FIELDS = ("seed", "negative_prompt")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OmniDiffusionSamplingParams)}


class InvalidRequestError(ValueError):
    """A request the model cannot run. `param` names the field at fault (the HTTP error's param)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def params_set_by_user(sp: OmniDiffusionSamplingParams) -> dict[str, Any]:
    """The sampling parameters that differ from their unset default."""
    return {name: getattr(sp, name) for name, default in _DEFAULTS.items() if getattr(sp, name) != default}


def _allowed_list(spec: SamplingSpec) -> str:
    return ", ".join(sorted(spec.accepted_params - UNIVERSAL_PARAMS)) or "none"


def check_used_params(spec: SamplingSpec, req: OmniDiffusionRequest) -> None:
    user_set = params_set_by_user(req.sampling_params)
    for name, value in user_set.items():
        if name not in spec.accepted_params:
            raise InvalidRequestError(
                f"{name}={value!r} is not used by {spec.model}; its sampling parameters are: {_allowed_list(spec)}",
                name,
            )
        if name in spec.unavailable:
            raise InvalidRequestError(f"{name} cannot be used here: {spec.unavailable[name]}", name)
        needed = spec.refines.get(name)
        if needed is not None and needed not in user_set:
            raise InvalidRequestError(f"{name} is used only together with {needed}, which this request does not set",
                                      name)
    if spec.cfg is None and any(p.negative_prompt is not None for p in req.prompts):
        raise InvalidRequestError(f"{spec.model} runs no classifier-free guidance, so it takes no negative_prompt",
                                  "negative_prompt")


def check_lora(spec: SamplingSpec, sp: OmniDiffusionSamplingParams) -> None:
    """Adapters a request names must be loaded (a misspelt one would silently run without it)."""
    if sp.lora is None:
        return
    if not spec.lora_adapters:
        raise InvalidRequestError(
            f"lora={sp.lora!r} is not used by {spec.model}: no LoRA adapters are loaded; load them at start "
            "with lora_modules={name: path} (serve --lora-modules name=path)",
            "lora",
        )
    unknown = sorted(set(sp.lora) - spec.lora_adapters)
    if unknown:
        raise InvalidRequestError(
            f"unknown LoRA adapter(s) {', '.join(map(repr, unknown))}; the loaded adapters are: "
            f"{', '.join(sorted(spec.lora_adapters))}",
            "lora",
        )


def active_lora(lora: dict[str, float] | None) -> dict[str, float] | None:
    """The adapters that change the output, by name: scale 0 is no adapter, so such a request
    batches with (and equals) one without it."""
    active = {name: scale for name, scale in sorted((lora or {}).items()) if scale != 0}
    return active or None


def check_images(spec: SamplingSpec, req: OmniDiffusionRequest) -> None:
    from PIL import Image

    counts = [len(p.images or ()) for p in req.prompts]
    images = spec.images
    if images is None:
        if any(counts):
            raise InvalidRequestError(f"{spec.model} takes no input images", "image")
        return
    if images.required and not all(counts):
        raise InvalidRequestError(
            f"{spec.model} needs an input image with every prompt ({{'prompt': ..., 'image': PIL.Image}})", "image"
        )
    if any(counts) and not all(counts):
        raise InvalidRequestError("the prompts of one request must all bring input images or none", "image")
    if max(counts) > images.max_per_prompt:
        raise InvalidRequestError(
            f"{spec.model} takes at most {images.max_per_prompt} input image(s) per prompt, got {max(counts)}", "image"
        )
    for prompt in req.prompts:
        for image in prompt.images or ():
            if not isinstance(image, Image.Image):
                raise InvalidRequestError(f"input images must be PIL images, got {type(image).__name__}", "image")
            check_image(spec, image)
    if not any(counts):
        for name in sorted(images.params):
            if getattr(req.sampling_params, name) is not None:
                raise InvalidRequestError(f"{name} is used only with an input image; this request has none", name)
    sp = req.sampling_params
    if images.size_from_aspect_ratio and sp.max_area is not None and (sp.height is not None or sp.width is not None):
        raise InvalidRequestError(
            "max_area sizes the output from the input image's aspect ratio; give it or height and width, not both",
            "max_area",
        )


def check_image(spec: SamplingSpec, image) -> None:
    """One input image against the spec's limits: mode, sides, pixels."""
    width, height = image.size
    if image.mode in HIGH_BIT_DEPTH_MODES:
        raise InvalidRequestError(
            f"input image mode {image.mode!r} (more than 8 bits per channel) is not supported; send an 8-bit "
            "RGB, RGBA, grayscale or palette image",
            "image",
        )
    if min(width, height) < 1 or max(width, height) > spec.max_side:
        raise InvalidRequestError(
            f"input image is {width}x{height}; each side must be between 1 and {spec.max_side} pixels", "image"
        )
    limit = spec.images.max_input_pixels
    if width * height > limit:
        raise InvalidRequestError(
            f"input image is {width}x{height} = {width * height} pixels; at most {limit} are allowed", "image"
        )


def with_rgb_images(req: OmniDiffusionRequest) -> OmniDiffusionRequest:
    """The request with every input image in RGB (an alpha channel is dropped, a palette or grey
    expanded), as the pipelines take them; a request whose images are all RGB comes back unchanged."""
    if all(image.mode == "RGB" for p in req.prompts for image in p.images or ()):
        return req
    prompts = [
        dataclasses.replace(p, images=[i if i.mode == "RGB" else i.convert("RGB") for i in p.images])
        if p.images
        else p
        for p in req.prompts
    ]
    return dataclasses.replace(req, prompts=prompts)


def _size_from_image(spec: SamplingSpec, req: OmniDiffusionRequest) -> dict[str, int]:
    """The size of the spec's sizing input image (scaled down to the default pixel budget), or its
    aspect ratio at max_area pixels; rounded down to the size multiple and clamped to the limits."""
    width, height = req.prompts[0].images[spec.images.size_image].size
    if spec.images.size_from_aspect_ratio:
        area = req.sampling_params.max_area or spec.defaults["max_area"]
        width, height = size_at_area(width, height, area, spec.images.area_rounding)
    else:
        scale = min(1.0, (spec.images.default_max_pixels / (width * height)) ** 0.5)
        width, height = int(width * scale), int(height * scale)
    m = spec.size_multiple

    def clamp(side: int) -> int:
        return max(spec.smallest_side, min(spec.max_side // m * m, side // m * m))

    return {"height": clamp(height), "width": clamp(width)}


def resolve_params(spec: SamplingSpec, req: OmniDiffusionRequest) -> OmniDiffusionSamplingParams:
    """The request's sampling parameters with every unset one the model takes given its default."""
    sp = req.sampling_params
    has_images = any(p.images for p in req.prompts)
    filled: dict[str, Any] = {}
    if has_images and spec.images.size_from_image and sp.height is None and sp.width is None:
        filled.update(_size_from_image(spec, req))
    for name, default in spec.defaults.items():
        if name in filled or getattr(sp, name) is not None:
            continue
        if _default_applies(spec, req, name, has_images):
            filled[name] = default
    if active_lora(sp.lora) != sp.lora:
        filled["lora"] = active_lora(sp.lora)
    return dataclasses.replace(sp, **filled) if filled else sp


def _default_applies(spec: SamplingSpec, req: OmniDiffusionRequest, name: str, has_images: bool) -> bool:
    if spec.images is not None and name in spec.images.params and not has_images:
        return False
    if name == "true_cfg_scale":
        # As in the reference pipelines: the default true-CFG scale is used when the prompts bring a
        # negative prompt; without one the model runs without CFG.
        return any(p.negative_prompt is not None for p in req.prompts)
    return True


def check_resolved(spec: SamplingSpec, req: OmniDiffusionRequest) -> None:
    sp = req.sampling_params
    m = spec.size_multiple
    for name in ("height", "width"):
        value = getattr(sp, name)
        if name in spec.params and value is not None and (value % m or not spec.smallest_side <= value <= spec.max_side):
            raise InvalidRequestError(
                f"{name}={value} is not supported by {spec.model}: it must be a multiple of {m} between "
                f"{spec.smallest_side} and {spec.max_side}",
                name,
            )
    t = spec.frames_multiple
    if t is not None and sp.num_frames is not None and (sp.num_frames - 1) % t:
        raise InvalidRequestError(
            f"num_frames={sp.num_frames} is not supported by {spec.model}: it must be {t}k+1 (e.g. {t + 1}, "
            f"{4 * t + 1}), because the VAE compresses {t} frames into one latent frame after the first",
            "num_frames",
        )
    limit = spec.max_sequence_length
    if limit is not None and sp.max_sequence_length is not None and sp.max_sequence_length > limit:
        raise InvalidRequestError(
            f"max_sequence_length={sp.max_sequence_length} exceeds the text encoder's limit of {limit} tokens",
            "max_sequence_length",
        )
    check_audio_window(spec, sp)
    for name, count in spec.index_limits.items():
        value = getattr(sp, name)
        if value is not None and not all(0 <= i < count for i in value):
            raise InvalidRequestError(
                f"{name}={list(value)} is out of range: {spec.model} takes indices 0 to {count - 1}", name
            )
    if sp.strength is not None and sp.num_inference_steps is not None and int(sp.num_inference_steps * sp.strength) < 1:
        raise InvalidRequestError(
            f"strength={sp.strength} with num_inference_steps={sp.num_inference_steps} leaves no denoising step; "
            "raise either",
            "strength",
        )
    check_cfg(spec, req)
    check_input_image_sizes(spec, req)


def _image_sizes(spec: SamplingSpec, sp: OmniDiffusionSamplingParams, prompt) -> tuple[tuple[int, int], ...]:
    """The sizes the model uses a prompt's images at (their own sizes where it declares no rule)."""
    return tuple(spec.input_image_size(image.size, sp) or image.size for image in prompt.images or ())


def check_input_image_sizes(spec: SamplingSpec, req: OmniDiffusionRequest) -> None:
    """One pipeline call stacks its prompts' images, so they must be used at one size, within limits."""
    if spec.images is None or not req.prompts[0].images:
        return
    sp = req.sampling_params
    sizes = {_image_sizes(spec, sp, p) for p in req.prompts}
    if len(sizes) > 1:
        raise InvalidRequestError(
            f"{spec.model} uses the input images of this request at different sizes {sorted(sizes)}; the prompts of "
            "one request must bring images used at one size (send the others as separate requests)",
            "image",
        )
    if spec.input_image_size(req.prompts[0].images[0].size, sp) is None:
        return
    for width, height in next(iter(sizes)):
        if min(width, height) < spec.smallest_side or max(width, height) > spec.max_side:
            raise InvalidRequestError(
                f"an input image of {spec.model} would be used at {width}x{height}; its sides must be between "
                f"{spec.smallest_side} and {spec.max_side} pixels",
                "image",
            )


def check_audio_window(spec: SamplingSpec, sp: OmniDiffusionSamplingParams) -> None:
    """An audio clip must start before it ends and end within the model's longest clip (a longer
    end would silently give a shorter clip)."""
    limit = spec.max_audio_seconds
    if limit is None or sp.audio_end_in_s is None:
        return
    start = sp.audio_start_in_s or 0.0
    if sp.audio_end_in_s > limit:
        raise InvalidRequestError(
            f"audio_end_in_s={sp.audio_end_in_s} is beyond {spec.model}'s longest clip of {limit:g} s; "
            f"audio_end_in_s must be at most {limit:g}",
            "audio_end_in_s",
        )
    if start >= sp.audio_end_in_s:
        raise InvalidRequestError(
            f"audio_start_in_s={start} must be less than audio_end_in_s={sp.audio_end_in_s}",
            "audio_start_in_s",
        )


def check_cfg(spec: SamplingSpec, req: OmniDiffusionRequest) -> None:
    """A negative prompt, a CFG scale or a CFG-only parameter that would be silently ignored is an error."""
    sp = req.sampling_params
    has_negative = [p.negative_prompt is not None for p in req.prompts]
    if spec.cfg == "guidance" and any(has_negative) and not sp.guidance_scale > 1:
        raise InvalidRequestError(
            f"negative_prompt is not used when guidance_scale={sp.guidance_scale} (classifier-free guidance "
            "needs guidance_scale > 1)",
            "negative_prompt",
        )
    for name in sorted(spec.cfg_only_params):
        if getattr(sp, name) is not None and not cfg_enabled(spec, sp):
            rule = "guidance_scale > 1" if spec.cfg == "guidance" else "true_cfg_scale > 1 and a negative_prompt"
            raise InvalidRequestError(
                f"{name} is used only with classifier-free guidance ({rule}), which this request does not run", name
            )
    if spec.cfg == "true_cfg":
        scale = sp.true_cfg_scale if sp.true_cfg_scale is not None else 1.0
        if any(has_negative) and not scale > 1:
            raise InvalidRequestError(
                "negative_prompt is used only with true_cfg_scale > 1 (true classifier-free guidance)",
                "negative_prompt",
            )
        if scale > 1 and not all(has_negative):
            raise InvalidRequestError(
                f"true_cfg_scale={sp.true_cfg_scale} needs a negative_prompt (use ' ' for an empty one)",
                "true_cfg_scale",
            )


def cfg_enabled(spec: SamplingSpec, sp: OmniDiffusionSamplingParams) -> bool:
    """Whether an admitted request runs classifier-free guidance (two branches per step)."""
    if spec.cfg == "guidance":
        return sp.guidance_scale is not None and sp.guidance_scale > 1
    if spec.cfg == "true_cfg":
        # Admission made sure every prompt has a negative prompt.
        return sp.true_cfg_scale is not None and sp.true_cfg_scale > 1
    return False


def admit(spec: SamplingSpec, req: OmniDiffusionRequest) -> OmniDiffusionRequest:
    """The request with resolved sampling parameters, or InvalidRequestError."""
    if not req.prompts:
        raise InvalidRequestError("a request needs at least one prompt", "prompt")
    check_lora(spec, req.sampling_params)
    check_used_params(spec, req)
    check_images(spec, req)
    req = with_rgb_images(req)
    resolved = dataclasses.replace(req, sampling_params=resolve_params(spec, req))
    check_resolved(spec, resolved)
    return resolved


def batch_key(spec: SamplingSpec, req: OmniDiffusionRequest) -> tuple:
    """Admitted requests with equal keys give each prompt the same output alone and batched: the key
    holds every resolved parameter but the per-prompt ones (so the LoRA adapters and their scales: one
    batch runs one adapter set), whether CFG runs, and the sizes at which
    the model uses each prompt's input images (their own sizes where it declares no rule: editing
    models derive shapes from them)."""
    sp = req.sampling_params
    params = tuple(
        (f.name, getattr(sp, f.name)) for f in dataclasses.fields(sp) if f.name not in _PER_PROMPT_FIELDS
    )
    images = {_image_sizes(spec, sp, p) for p in req.prompts}
    return params, cfg_enabled(spec, sp), tuple(sorted(images))
