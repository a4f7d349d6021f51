"""Reading a diffusers pipeline: what it takes (its `__call__` signature), what it makes (the output
class it returns), and how a resolved diffserve request becomes one `__call__`.

Nothing here is written per pipeline class: the signature says which of our sampling parameters a
pipeline takes (under diffusers' names), its concrete defaults become the SamplingSpec's defaults, and
what the signature leaves to the model (height=None) is read from the loaded model where a common
convention exists (sample size x VAE scale factor), else left unset for diffusers to decide.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import typing
from dataclasses import dataclass
from typing import Any

import torch

from diffserve.models.spec import ImageInputSpec, SamplingSpec
from diffserve.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

# Our sampling parameter -> the diffusers __call__ keywords that mean it, in order of preference.
PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "height": ("height",),
    "width": ("width",),
    "num_inference_steps": ("num_inference_steps",),
    "guidance_scale": ("guidance_scale",),
    "guidance_scale_2": ("guidance_scale_2",),
    "true_cfg_scale": ("true_cfg_scale",),
    "max_sequence_length": ("max_sequence_length",),
    "num_frames": ("num_frames",),
    "fps": ("frame_rate", "fps"),
    "strength": ("strength",),
    "audio_start_in_s": ("audio_start_in_s",),
    "audio_end_in_s": ("audio_end_in_s", "audio_length_in_s", "audio_duration_s"),
    "skip_guidance_layers": ("skip_guidance_layers",),
    "skip_layer_guidance_scale": ("skip_layer_guidance_scale",),
    "skip_layer_guidance_start": ("skip_layer_guidance_start",),
    "skip_layer_guidance_stop": ("skip_layer_guidance_stop",),
}
# Skip-layer guidance (SD3): our parameters that only tune skip_guidance_layers.
SLG_TUNING = ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")
# num_outputs_per_prompt, by modality's naming.
OUTPUTS_PER_PROMPT = ("num_images_per_prompt", "num_videos_per_prompt", "num_waveforms_per_prompt",
                      "num_audios_per_prompt")
# The output field of each modality's pipeline output class (ImagePipelineOutput.images, ...).
OUTPUT_FIELDS = {"images": "image", "frames": "video", "audios": "audio"}
MODALITY_FIELD = {modality: name for name, modality in OUTPUT_FIELDS.items()}
# Components that denoise (the adapter's `_dit_modules`): transformer, transformer_2, unet, prior.
DENOISER_PREFIXES = ("transformer", "unet", "prior")
# diffusers' pipeline naming for those that cannot run without an input image even where the
# signature's `image` defaults to None.
NEEDS_IMAGE_NAMES = ("ImageToVideo", "Img2Img", "Image2Image", "Image2Video")


def call_parameters(pipe) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def concrete_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def output_modality(pipe, params: dict[str, inspect.Parameter]) -> str:
    """"image", "video" or "audio": from the output class `__call__` returns (its images / frames /
    audios field), else from what the signature takes."""
    annotation = inspect.signature(type(pipe).__call__).return_annotation
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        fields = {f.name for f in dataclasses.fields(candidate)} if dataclasses.is_dataclass(candidate) else set()
        for name, modality in OUTPUT_FIELDS.items():
            if name in fields:
                return modality
    if "num_frames" in params or "num_videos_per_prompt" in params:
        return "video"
    if {"num_waveforms_per_prompt", "audio_length_in_s", "audio_end_in_s"} & set(params):
        return "audio"
    if "num_images_per_prompt" in params:
        return "image"
    raise ValueError(
        f"{type(pipe).__name__}: cannot tell whether it makes images, videos or audio (its __call__ returns "
        f"{annotation}); the diffusers adapter serves pipelines whose output has images, frames or audios"
    )


def denoiser_names(pipe) -> list[str]:
    names = [n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module) and n.startswith(DENOISER_PREFIXES)]
    if not names:
        raise ValueError(
            f"{type(pipe).__name__} has no denoiser the adapter recognises (a component named "
            f"{', '.join(p + '*' for p in DENOISER_PREFIXES)}); its components: {', '.join(pipe.components)}"
        )
    return names


def _first_attr(obj, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if concrete_number(value):
            return int(value)
    return None


def spatial_scale(pipe) -> int | None:
    """Output pixels per latent pixel (the VAE's spatial compression)."""
    return _first_attr(pipe, ("vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_scale_factor"))


def temporal_scale(pipe) -> int | None:
    """Video frames per latent frame after the first."""
    return _first_attr(pipe, ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"))


def _config(module) -> dict[str, Any]:
    """A component's config as a dict (diffusers' FrozenDict, or transformers' PretrainedConfig)."""
    config = getattr(module, "config", None)
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def spatial_patch(denoiser) -> int:
    patch = _config(denoiser).get("patch_size")
    if isinstance(patch, (list, tuple)):  # (t, h, w) for video transformers
        patch = patch[-1]
    return int(patch) if concrete_number(patch) else 1


def model_default_size(pipe, denoiser) -> tuple[int | None, int | None]:
    """(height, width) the model generates when the call leaves them unset: its sample size in latent
    pixels times the VAE scale factor, the convention of diffusers' pipelines."""
    scale = spatial_scale(pipe)
    if scale is None:
        return None, None
    config = _config(denoiser)
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        sample = config.get("sample_size")
    if "sample_height" in config and "sample_width" in config:  # CogVideoX
        sample = (config["sample_height"], config["sample_width"])
    if concrete_number(sample):
        return int(sample) * scale, int(sample) * scale
    if isinstance(sample, (list, tuple)) and len(sample) == 2 and all(map(concrete_number, sample)):
        return int(sample[0]) * scale, int(sample[1]) * scale
    return None, None


def audio_tokens(denoiser) -> int:
    """Latent positions per clip, for the work estimate only: the denoiser's sample size (the frame count
    of 1-D audio DiTs; the length of a spectrogram UNet's latent, whose width it ignores)."""
    sample = _config(denoiser).get("sample_size")
    if concrete_number(sample):
        return int(sample)
    if isinstance(sample, (list, tuple)) and sample and all(map(concrete_number, sample)):
        return int(torch.tensor(sample).prod())
    return 1024  # unknown: a typical clip's latent length


def audio_sample_rate(pipe) -> int | None:
    rate = getattr(pipe, "sample_rate", None)
    if concrete_number(rate):
        return int(rate)
    for component in ("vocoder", "vae"):
        config = _config(getattr(pipe, component, None))
        for key in ("sampling_rate", "sample_rate"):
            if concrete_number(config.get(key)):
                return int(config[key])
    return None


def default_video_fps() -> int:
    """diffusers' own default when a video pipeline states no frame rate (export_to_video's fps)."""
    from diffusers.utils import export_to_video

    return inspect.signature(export_to_video).parameters["fps"].default


@dataclass(frozen=True)
class CallPlan:
    """How a pipeline is called: which diffusers keyword each of our parameters goes to, and how the
    per-prompt parts (outputs, negative prompts, images, generators) and progress are passed."""

    modality: str
    # our sampling parameter -> diffusers keyword
    param_names: dict[str, str]
    # diffusers' num_*_per_prompt keyword; None: each prompt is repeated instead
    outputs_per_prompt: str | None
    # Classifier-free guidance: "guidance", "true_cfg" or None (our SamplingSpec's cfg modes).
    cfg: str | None
    # What diffusers uses for a prompt without a negative prompt when it is given a list: its default
    # when that is a string; None: it treats "no negative prompt" differently (e.g. zero embeddings),
    # so prompts with and without one run as separate calls.
    negative_fill: str | None
    image_param: str | None
    image_required: bool
    takes_generator: bool
    # "on_step_end" (callback_on_step_end), "legacy" (callback + callback_steps) or None
    step_callback: str | None
    output_type: str
    # The keyword defaults diffserve's defaults come from, and what the model adds.
    signature_defaults: dict[str, Any]

    @property
    def output_field(self) -> str:
        return MODALITY_FIELD[self.modality]


def derive_call_plan(pipe) -> CallPlan:
    params = call_parameters(pipe)
    name = type(pipe).__name__
    for needed in ("prompt", "output_type"):
        if needed not in params:
            raise ValueError(f"{name}.__call__ takes no {needed!r}; the diffusers adapter serves text-prompted pipelines")
    modality = output_modality(pipe, params)
    names = {ours: next(t for t in theirs if t in params) for ours, theirs in PARAM_NAMES.items()
             if any(t in params for t in theirs)}
    cfg = None
    if "negative_prompt" in params:
        cfg = "true_cfg" if "true_cfg_scale" in params else "guidance" if "guidance_scale" in params else None
    if cfg != "true_cfg":
        names.pop("true_cfg_scale", None)
    negative_default = params["negative_prompt"].default if "negative_prompt" in params else None
    image_param = "image" if "image" in params else None
    step_callback = "on_step_end" if "callback_on_step_end" in params else (
        "legacy" if {"callback", "callback_steps"} <= set(params) else None)
    if step_callback is None:
        logger.warning("%s takes no step callback: no progress, and a request stops between transformer blocks, "
                       "not between steps", name)
    if "generator" not in params:
        logger.warning("%s takes no generator: its outputs cannot be seeded", name)
    defaults = {
        theirs: params[theirs].default for theirs in names.values()
        if concrete_number(params[theirs].default)
    }
    return CallPlan(
        modality=modality,
        param_names=names,
        outputs_per_prompt=next((n for n in OUTPUTS_PER_PROMPT if n in params), None),
        cfg=cfg,
        negative_fill=negative_default if isinstance(negative_default, str) else None,
        image_param=image_param,
        image_required=image_param is not None and (
            params[image_param].default is inspect.Parameter.empty or any(n in name for n in NEEDS_IMAGE_NAMES)),
        takes_generator="generator" in params,
        step_callback=step_callback,
        output_type="np" if modality == "audio" else "pt",
        signature_defaults=defaults,
    )


def derive_spec(pipe, plan: CallPlan) -> SamplingSpec:
    """Our SamplingSpec for a loaded diffusers pipeline."""
    denoiser = getattr(pipe, denoiser_names(pipe)[0])
    defaults = {ours: plan.signature_defaults[theirs] for ours, theirs in plan.param_names.items()
                if theirs in plan.signature_defaults}
    params = set(plan.param_names) - {"strength"}
    if {"height", "width"} <= params:
        height, width = model_default_size(pipe, denoiser)
        for key, value in (("height", height), ("width", width)):
            if key not in defaults and value is not None:
                defaults[key] = value
    if plan.modality == "video":
        params.add("fps")  # the output's frame rate, even where the model is not conditioned on it
        defaults.setdefault("fps", default_video_fps())
    images = None
    if plan.image_param is not None:
        images = ImageInputSpec(max_per_prompt=1, required=plan.image_required,
                                params=frozenset({"strength"} & set(plan.param_names)))
    elif "strength" in plan.param_names:
        params.add("strength")
    multiple = (spatial_scale(pipe) or 1) * spatial_patch(denoiser)
    return SamplingSpec(
        **skip_layer_guidance_rules(plan, denoiser),
        modality=plan.modality,
        params=frozenset(params),
        defaults=defaults,
        cfg=plan.cfg,
        images=images,
        size_multiple=multiple if {"height", "width"} <= params else 1,
        frames_multiple=temporal_scale(pipe) if "num_frames" in params else None,
        fixed_tokens=audio_tokens(denoiser) if plan.modality == "audio" else None,
        model=type(pipe).__name__,
    )


def skip_layer_guidance_rules(plan: CallPlan, denoiser) -> dict[str, Any]:
    """Our rules for skip-layer guidance where the pipeline takes it (diffusers' SD3): its tuning
    parameters need the layers, it runs only with CFG, and the layers are block indices."""
    if "skip_guidance_layers" not in plan.param_names or plan.cfg is None:
        return {}
    rules: dict[str, Any] = {
        "refines": {name: "skip_guidance_layers" for name in SLG_TUNING if name in plan.param_names},
        "cfg_only_params": frozenset({"skip_guidance_layers"}),
    }
    layers = _config(denoiser).get("num_layers")
    if concrete_number(layers):
        rules["index_limits"] = {"skip_guidance_layers": int(layers)}
    return rules


# -- one call ----------------------------------------------------------------------------------------


def call_groups(req: OmniDiffusionRequest, plan: CallPlan) -> list[list[int]]:
    """The request's prompts (indices) in the groups one diffusers call can take, in order of first
    appearance: diffusers takes negative prompts for all prompts or none (unless its default fills
    the gaps), and one input image per call."""
    groups: dict[tuple, list[int]] = {}
    for i, prompt in enumerate(req.prompts):
        has_negative = prompt.negative_prompt is not None and plan.negative_fill is None
        image = id(prompt.images[0]) if prompt.images else None
        groups.setdefault((has_negative, image), []).append(i)
    return list(groups.values())


def generators(seeds: list[int], outputs_per_prompt: int):
    """One CPU generator per prompt, repeated for that prompt's outputs (diffusers takes one per output
    in a list and draws each output's noise from it in turn); a lone generator as itself."""
    gens = []
    for seed in seeds:
        gens += [torch.Generator("cpu").manual_seed(seed)] * outputs_per_prompt
    return gens[0] if len(gens) == 1 else gens


def call_kwargs(plan: CallPlan, req: OmniDiffusionRequest, group: list[int]) -> dict[str, Any]:
    """The diffusers keywords for the prompts `group` of an admitted request (progress not included)."""
    sp = req.sampling_params
    prompts = [req.prompts[i] for i in group]
    k = sp.num_outputs_per_prompt
    # Without a num_*_per_prompt keyword each prompt is repeated: one output per repeat.
    repeat = 1 if plan.outputs_per_prompt is not None else k
    kwargs: dict[str, Any] = {
        "prompt": [p.prompt for p in prompts for _ in range(repeat)],
        "output_type": "latent" if sp.output_type == "latent" else plan.output_type,
        "return_dict": True,
    }
    if plan.outputs_per_prompt is not None:
        kwargs[plan.outputs_per_prompt] = k
    for ours, theirs in plan.param_names.items():
        value = getattr(sp, ours)
        if value is not None:
            kwargs[theirs] = list(value) if isinstance(value, tuple) else value  # diffusers takes lists
    negatives = [p.negative_prompt for p in prompts]
    if any(n is not None for n in negatives):
        kwargs["negative_prompt"] = [plan.negative_fill if n is None else n for n in negatives for _ in range(repeat)]
    if prompts[0].images:
        kwargs[plan.image_param] = prompts[0].images[0]
    if plan.takes_generator:
        kwargs["generator"] = generators([p.seed for p in prompts], k)
    return kwargs


def to_float_output(value, modality: str) -> torch.Tensor:
    """diffusers' output (output_type "pt", or "np" for audio) as our float32 layout: images
    [N, C, H, W], videos [N, C, F, H, W], audio [N, channels, samples]."""
    if isinstance(value, (list, tuple)):  # a list of per-sample arrays or tensors
        value = torch.stack([v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for v in value])
    if not isinstance(value, torch.Tensor):
        value = torch.from_numpy(value)
    value = value.float()
    if modality == "audio":
        return value.unsqueeze(1) if value.ndim == 2 else value  # mono [N, samples] -> [N, 1, samples]
    if modality == "video":
        return value.permute(0, 2, 1, 3, 4)  # diffusers' [N, F, C, H, W]
    return value
