"""The model conformance suite's table: per architecture, scenarios and how to run the reference.

A new model joins the suite by adding a ConformanceCase here (and a tiny builder in __init__); the
test in tests/models/test_conformance.py runs every case through the registry and compares with the
diffusers pipeline on the same weights and seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffserve.request import OmniDiffusionSamplingParams


@dataclass(frozen=True)
class ConformanceScenario:
    name: str
    prompts: list[Any]
    params: OmniDiffusionSamplingParams
    # Per prompt; the reference gets one CPU generator per seed.
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass(frozen=True)
class ConformanceCase:
    arch: str
    scenarios: list[ConformanceScenario]
    # (checkpoint path, scenario) -> reference float images [N, C, H, W] in [0, 1]
    run_reference: Callable[[str, ConformanceScenario], torch.Tensor]
    # max |ours - reference| on the float output, fp32 on CPU
    tolerance: float = 1e-4
    # The scenario the parallel tests (TP, CFG, HSDP vs one process) run; it should use CFG.
    # None: the first scenario.
    parallel_scenario: str | None = None
    # The parallel tests run the first case of each family. None: the arch up to its first "-"
    # (flux-schnell is in the family flux; wan2.1-i2v in wan2.1).
    family: str | None = None
    # The step-cache tests (tests/cache/test_cache_conformance.py) run the parallel scenario for
    # `cache_steps` steps and allow a relative L2 distance of `cache_max_rel_l2` to the uncached output
    # under their permissive settings.
    cache_steps: int = 4
    cache_max_rel_l2: float = 0.2
    # "native": a diffserve pipeline; "diffusers": served through the diffusers adapter, whose parallel
    # modes are refused at engine start (tests/distributed/test_parallel.py asserts the error).
    backend: str = "native"
    # The step caches the model takes; the cache tests assert a clear error for the others.
    cache_backends: tuple[str, ...] = ("cache_dit", "tea_cache")

    @property
    def pipeline_family(self) -> str:
        return self.family or self.arch.split("-")[0]

    def scenario(self, name: str | None) -> ConformanceScenario:
        if name is None:
            return self.scenarios[0]
        return next(s for s in self.scenarios if s.name == name)


def output_tensor(output):
    """The float output of a DiffusionOutput run with output_type="pt": video frames, images or audio."""
    for value in (output.frames, output.images, output.audio):
        if value is not None:
            return value
    raise ValueError("the output holds no frames, images or audio")


def _generators(scenario: ConformanceScenario):
    gens = [torch.Generator("cpu").manual_seed(s) for s in scenario.seeds]
    return gens[0] if len(gens) == 1 else gens


def sample_image(width: int, height: int, seed: int):
    """A deterministic, structured RGB test picture (smooth gradients plus a few blocks)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([x, y, 1 - (x + y) / 2], axis=-1)
    for _ in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        image[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.random(3)
    return Image.fromarray((image * 255).astype(np.uint8))


def run_flux_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
    sp = scenario.params
    negatives = [p.get("negative_prompt") for p in scenario.prompts if isinstance(p, dict)]
    negatives = [n for n in negatives if n is not None]
    images = [p["image"] for p in scenario.prompts if isinstance(p, dict) and "image" in p]
    prompts = [p["prompt"] if isinstance(p, dict) else p for p in scenario.prompts]
    kwargs = {}
    if images:
        pipe = FluxImg2ImgPipeline(**pipe.components)
        kwargs.update(image=images, strength=sp.strength)
    pipe.set_progress_bar_config(disable=True)
    if sp.guidance_scale is not None:
        kwargs["guidance_scale"] = sp.guidance_scale
    return pipe(
        prompt=prompts,
        negative_prompt=negatives or None,
        true_cfg_scale=1.0 if sp.true_cfg_scale is None else sp.true_cfg_scale,  # unset: diffusers' 1.0
        height=sp.height,
        width=sp.width,
        num_inference_steps=sp.num_inference_steps,
        num_images_per_prompt=sp.num_outputs_per_prompt,
        max_sequence_length=sp.max_sequence_length,
        generator=_generators(scenario),
        output_type="pt",
        **kwargs,
    ).images


def _flux_scenarios(guidance: float | None) -> list[ConformanceScenario]:
    def params(**kw):
        base = dict(num_inference_steps=3, max_sequence_length=16, guidance_scale=guidance, output_type="pt")
        return OmniDiffusionSamplingParams(**{**base, **kw})

    return [
        ConformanceScenario(
            "batch2_nonsquare", ["a red fox in snow", "a blue car"], params(height=32, width=48), seeds=[0, 1]
        ),
        ConformanceScenario(
            "true_cfg_batch2",
            [
                {"prompt": "a red fox in snow", "negative_prompt": "blurry"},
                {"prompt": "a blue car", "negative_prompt": "low quality"},
            ],
            params(height=48, width=32, true_cfg_scale=4.0),
            seeds=[3, 4],
        ),
        ConformanceScenario(
            "two_outputs_per_prompt", ["a castle"], params(height=32, width=32, num_outputs_per_prompt=2), seeds=[7]
        ),
        ConformanceScenario(
            "image_to_image_batch2_nonsquare",
            [
                {"prompt": "a red fox in snow", "image": sample_image(40, 28, 0)},
                {"prompt": "a blue car", "image": sample_image(48, 32, 1)},
            ],
            params(height=32, width=48, strength=0.7, num_inference_steps=4),
            seeds=[5, 6],
        ),
    ]


def run_flux_kontext_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    """diffusers' FluxKontextPipeline. It always scales the output to `max_area` pixels at the aspect
    ratio of the height/width it gets: our explicit height/width are therefore passed with
    max_area = height * width, and an output sized from the input image with that image's size."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sp = scenario.params
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in scenario.prompts]
    images = [p["image"] for p in prompts if "image" in p]
    negatives = [p["negative_prompt"] for p in prompts if "negative_prompt" in p]
    if sp.height is not None:
        height, width, max_area = sp.height, sp.width, sp.height * sp.width
    else:
        (width, height), max_area = images[0].size, sp.max_area
    return pipe(
        image=images or None,
        prompt=[p["prompt"] for p in prompts],
        negative_prompt=negatives or None,
        true_cfg_scale=1.0 if sp.true_cfg_scale is None else sp.true_cfg_scale,  # unset: diffusers' 1.0
        height=height,
        width=width,
        max_area=max_area,
        _auto_resize=sp.auto_resize is not False,
        num_inference_steps=sp.num_inference_steps,
        # 2.5 is FLUX.1 Kontext's recommended guidance and our default (diffusers' call defaults to 3.5).
        guidance_scale=2.5 if sp.guidance_scale is None else sp.guidance_scale,
        num_images_per_prompt=sp.num_outputs_per_prompt,
        max_sequence_length=sp.max_sequence_length,
        generator=_generators(scenario),
        output_type="pt",
    ).images


def _flux_kontext_scenarios() -> list[ConformanceScenario]:
    # The Kontext sizes are about one megapixel, far too large for a tiny model on the CPU, so every
    # scenario with an image keeps its own size (auto_resize=False; the choice of a Kontext size is
    # tested in tests/models/flux/test_flux_kontext.py). The tiny VAE needs multiples of 4.
    def params(**kw):
        base = dict(num_inference_steps=3, max_sequence_length=16, auto_resize=False, output_type="pt")
        return OmniDiffusionSamplingParams(**{**base, **kw})

    return [
        # No size given: the output takes the images' 3:2 aspect ratio at max_area=1200 -> 40x28;
        # guidance from the model's default (2.5).
        ConformanceScenario(
            "edit_batch2_size_from_image",
            [
                {"prompt": "make the fox red", "image": sample_image(48, 32, 0)},
                {"prompt": "paint the car blue", "image": sample_image(48, 32, 1)},
            ],
            params(max_area=1200),
            seeds=[0, 1],
        ),
        # Images of different sizes used at one (50x35 rounds down to 48x32), each prompt with its
        # own negative prompt. 96 noisy + 96 reference tokens divide over 4 sequence-parallel ranks.
        ConformanceScenario(
            "true_cfg_batch2_image_sizes_differ",
            [
                {"prompt": "make the fox red", "negative_prompt": "blurry", "image": sample_image(48, 32, 2)},
                {"prompt": "paint the car blue", "negative_prompt": "low quality", "image": sample_image(50, 35, 3)},
            ],
            params(height=32, width=48, true_cfg_scale=4.0, guidance_scale=3.5),
            seeds=[3, 4],
        ),
        # A portrait image for a portrait output of another size, two outputs.
        ConformanceScenario(
            "two_outputs_per_prompt_nonsquare",
            [{"prompt": "add a hat", "image": sample_image(36, 52, 5)}],
            params(height=48, width=32, guidance_scale=2.0, num_outputs_per_prompt=2),
            seeds=[7],
        ),
        # Without an image Kontext is FLUX.1 text-to-image.
        ConformanceScenario("text_to_image", ["a castle"], params(height=32, width=32, auto_resize=None), seeds=[8]),
    ]


def run_demo_dit_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    """The built-in demo model has no diffusers pipeline: its reference is the training script's own
    plain-PyTorch model and sampler (diffserve.demo.reference) on the same weights."""
    from diffserve.demo.reference import load_pipeline

    pipe = load_pipeline(path)
    sp = scenario.params
    return pipe(
        prompts=[p["prompt"] if isinstance(p, dict) else p for p in scenario.prompts],
        seeds=scenario.seeds,
        negative_prompts=[p.get("negative_prompt") if isinstance(p, dict) else None for p in scenario.prompts],
        height=sp.height,
        width=sp.width,
        num_inference_steps=sp.num_inference_steps,
        guidance_scale=sp.guidance_scale,
        outputs_per_prompt=sp.num_outputs_per_prompt,
    )


def _demo_dit_scenarios() -> list[ConformanceScenario]:
    def params(**kw):
        return OmniDiffusionSamplingParams(num_inference_steps=3, output_type="pt", **kw)

    return [
        ConformanceScenario(
            "cfg_batch2_nonsquare",
            ["a red circle above a blue square", "a green triangle"],
            params(height=32, width=48, guidance_scale=4.0),
            seeds=[0, 1],
        ),
        ConformanceScenario(
            "cfg_negative_prompts",
            [
                {"prompt": "a yellow square left of a purple circle", "negative_prompt": "a blue circle"},
                {"prompt": "a red square", "negative_prompt": ""},
            ],
            params(height=48, width=32, guidance_scale=3.0),
            seeds=[3, 4],
        ),
        ConformanceScenario(
            "no_cfg_two_outputs_per_prompt",
            ["a blue triangle below a green circle"],
            params(height=32, width=32, guidance_scale=1.0, num_outputs_per_prompt=2),
            seeds=[7],
        ),
        # Size, steps and guidance from the checkpoint (64x64, model_index.json's defaults).
        ConformanceScenario(
            "model_defaults", ["a purple circle"], OmniDiffusionSamplingParams(output_type="pt"), seeds=[5]
        ),
    ]


CONFORMANCE_CASES: list[ConformanceCase] = [
    ConformanceCase("flux", _flux_scenarios(guidance=3.5), run_flux_reference, parallel_scenario="true_cfg_batch2"),
    ConformanceCase("flux-schnell", _flux_scenarios(guidance=None), run_flux_reference),
    # Reference tokens after the noisy ones. Measured (fp32, CPU, 2026-11-30): 7.5e-7 (size from
    # image), 9.5e-7 (true CFG, image sizes differ), 0.0 (two outputs), 7.2e-7 (text-to-image).
    ConformanceCase(
        "flux-kontext", _flux_kontext_scenarios(), run_flux_kontext_reference, family="flux-kontext",
        parallel_scenario="true_cfg_batch2_image_sizes_differ",
    ),
    ConformanceCase(
        "demo-dit", _demo_dit_scenarios(), run_demo_dit_reference, parallel_scenario="cfg_negative_prompts"
    ),
]


# -- Wan2.1 / Wan2.2 (video) -------------------------------------------------------------------------
# References return diffusers' output_type="pt" videos [N, F, C, H, W]; ours come from
# DiffusionOutput.frames in the same layout. Measured max-abs differences (fp32, CPU, 2026-11-26) are
# noted per case; every one is float32 rounding, far below the tolerance.


def wan_test_image(seed: int, width: int = 56, height: int = 40):
    """A deterministic RGB image (smooth gradients plus noise) for image-to-video scenarios."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    smooth = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(0.5, 1.0, size=3)
    pixels = np.clip(smooth + rng.normal(0, 0.15, size=smooth.shape), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def run_wan_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    """diffusers' WanPipeline / WanImageToVideoPipeline (from model_index.json). Its image-to-video
    call takes one image for all prompts, so prompts with different images run one call each, which
    is also what a batch must equal."""
    import diffusers

    from diffserve.registry import read_model_index

    pipe_cls = getattr(diffusers, read_model_index(path)["_class_name"])
    pipe = pipe_cls.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sp = scenario.params
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in scenario.prompts]
    kwargs = dict(
        height=sp.height,
        width=sp.width,
        num_frames=sp.num_frames,
        num_inference_steps=sp.num_inference_steps,
        guidance_scale=sp.guidance_scale,
        num_videos_per_prompt=sp.num_outputs_per_prompt,
        max_sequence_length=sp.max_sequence_length,
        output_type="pt",
    )
    if sp.guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = sp.guidance_scale_2

    def call(group: list[dict], seeds: list[int]) -> torch.Tensor:
        extra = {"image": group[0]["image"]} if "image" in group[0] else {}
        negatives = [p.get("negative_prompt") for p in group]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return pipe(
            prompt=[p["prompt"] for p in group],
            negative_prompt=[n or "" for n in negatives] if any(negatives) else None,
            generator=gens[0] if len(gens) == 1 else gens,
            **extra,
            **kwargs,
        ).frames

    shared_image = all(p.get("image") is prompts[0].get("image") for p in prompts)
    if shared_image:
        return call(prompts, scenario.seeds)
    return torch.cat([call([p], [s]) for p, s in zip(prompts, scenario.seeds)])


# tests/distributed/test_parallel.py runs the first case of each family ("wan2.1", "wan2.2") below:
# wan2.1-t2v covers WanPipeline, wan2.2-i2v the image-to-video pipeline with two experts.


def _wan_params(**kw) -> OmniDiffusionSamplingParams:
    defaults = dict(num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32, output_type="pt")
    return OmniDiffusionSamplingParams(**{**defaults, **kw})


def _wan_t2v_scenarios(size: tuple[int, int], dual: bool) -> list[ConformanceScenario]:
    height, width = size
    # With 4 UniPC steps (flow_shift 3) the timesteps are 999, 900, 750, 500: the Wan2.2 boundary
    # (0.875 -> t=875) hands steps 3 and 4 to transformer_2.
    steps = {"num_inference_steps": 4, "guidance_scale_2": 2.5} if dual else {}
    return [
        ConformanceScenario(
            "cfg_batch2_nonsquare",
            [
                {"prompt": "a cat surfing a wave", "negative_prompt": "blurry"},
                {"prompt": "a red car at night", "negative_prompt": "low quality"},
            ],
            _wan_params(height=height, width=width, **steps),
            seeds=[0, 1],
        ),
        ConformanceScenario(
            "no_cfg_two_outputs_per_prompt",
            ["a dog running in the park"],
            _wan_params(height=width, width=height, num_frames=9, guidance_scale=1.0, num_outputs_per_prompt=2),
            seeds=[7],
        ),
    ]


def _wan_i2v_scenarios(size: tuple[int, int], dual: bool, max_sequence_length: int) -> list[ConformanceScenario]:
    height, width = size
    steps = {"num_inference_steps": 4, "guidance_scale_2": 2.5} if dual else {}
    image, other = wan_test_image(0), wan_test_image(1, width=48, height=48)
    return [
        ConformanceScenario(
            "cfg_batch2_nonsquare_shared_image",
            [{"prompt": "the cat starts to walk", "image": image}, {"prompt": "the camera pans left", "image": image}],
            _wan_params(height=height, width=width, max_sequence_length=max_sequence_length, **steps),
            seeds=[0, 1],
        ),
        ConformanceScenario(
            "cfg_batch2_own_images_and_negatives",
            [
                {"prompt": "waves roll in", "negative_prompt": "static", "image": image},
                {"prompt": "a bird flies away", "negative_prompt": "blurry", "image": other},
            ],
            _wan_params(height=width, width=height, max_sequence_length=max_sequence_length, **steps),
            seeds=[3, 4],
        ),
    ]


# Order matters to tests/distributed/test_parallel.py, which runs the first case of each family
# ("wan2.1", "wan2.2"): wan2.1-t2v covers WanPipeline, wan2.2-i2v the image-to-video class with two
# experts.
CONFORMANCE_CASES.extend(
    [
        # Measured: 9.8e-7 (cfg_batch2_nonsquare), 0.0 (no_cfg_two_outputs_per_prompt).
        ConformanceCase(
            "wan2.1-t2v", _wan_t2v_scenarios((32, 48), dual=False), run_wan_reference,
            parallel_scenario="cfg_batch2_nonsquare",
        ),
        # CLIP image tokens + first-frame latent conditioning; diffusers' I2V transformer needs the
        # 512-token text length it hard-codes. Measured: 8.3e-7 (shared image), 1.9e-6 (own images).
        ConformanceCase(
            "wan2.1-i2v", _wan_i2v_scenarios((32, 48), dual=False, max_sequence_length=512), run_wan_reference,
            parallel_scenario="cfg_batch2_nonsquare_shared_image",
        ),
        # Latent conditioning only, two experts. Measured: 9.5e-7, 4.5e-6 (own images:
        # batched VAE encoding and CFG against one-prompt reference calls).
        ConformanceCase(
            "wan2.2-i2v", _wan_i2v_scenarios((32, 48), dual=True, max_sequence_length=32), run_wan_reference,
            parallel_scenario="cfg_batch2_nonsquare_shared_image",
        ),
        # Two experts switched at boundary_ratio, guidance_scale_2 on the second. Measured: 8.9e-7, 0.0.
        ConformanceCase(
            "wan2.2-t2v", _wan_t2v_scenarios((32, 48), dual=True), run_wan_reference,
            parallel_scenario="cfg_batch2_nonsquare",
        ),
        # TI2V-5B: 48-channel VAE at 16x, per-token timesteps. Measured: 0.0, 0.0.
        ConformanceCase("wan2.2-ti2v", _wan_t2v_scenarios((64, 96), dual=False), run_wan_reference),
        # TI2V-5B image-to-video: the first latent frame is the image, timestep 0. Measured: 1.2e-6, 1.5e-6.
        ConformanceCase(
            "wan2.2-ti2v-i2v", _wan_i2v_scenarios((64, 96), dual=False, max_sequence_length=32), run_wan_reference,
        ),
    ]
)


# -- Stable Audio Open (audio) -------------------------------------------------------------------------
# References return diffusers' waveforms [N, channels, samples]; ours come from DiffusionOutput.audio
# (output_type="pt") in the same layout.


def run_stable_audio_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    """diffusers' StableAudioPipeline with one CPU generator per seed (a list, so its scheduler grows
    one Brownian tree per prompt). It takes negative prompts for all prompts or none, so a mix runs one
    call per prompt, which is also what a batch must equal."""
    from diffusers import StableAudioPipeline

    from diffserve.models.spec import DEFAULTS_KEY
    from diffserve.registry import read_model_index

    pipe = StableAudioPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sp = scenario.params
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in scenario.prompts]
    kwargs = {"num_waveforms_per_prompt": sp.num_outputs_per_prompt}
    # Unset parameters: the checkpoint's own defaults (the tiny one runs 4 steps), else diffusers'.
    checkpoint_defaults = read_model_index(path).get(DEFAULTS_KEY, {})
    for name in ("audio_start_in_s", "audio_end_in_s", "num_inference_steps", "guidance_scale"):
        value = getattr(sp, name) if getattr(sp, name) is not None else checkpoint_defaults.get(name)
        if value is not None:
            kwargs[name] = value

    def call(group: list[dict], seeds: list[int]) -> torch.Tensor:
        negatives = [p.get("negative_prompt") for p in group]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return pipe(
            prompt=[p["prompt"] for p in group],
            negative_prompt=negatives if negatives[0] is not None else None,
            generator=gens if len(gens) > 1 else gens[0],
            output_type="pt",
            **kwargs,
        ).audios

    has_negative = {p.get("negative_prompt") is not None for p in prompts}
    if len(has_negative) == 1:
        return call(prompts, scenario.seeds)
    return torch.cat([call([p], [s]) for p, s in zip(prompts, scenario.seeds)])


def _stable_audio_scenarios() -> list[ConformanceScenario]:
    def params(**kw):
        return OmniDiffusionSamplingParams(**{"num_inference_steps": 4, "output_type": "pt", **kw})

    return [
        # CFG without a negative prompt: the unconditional branch is all zeros.
        ConformanceScenario("cfg_batch2", ["a drum loop", "rain on a tin roof"], params(), seeds=[0, 1]),
        ConformanceScenario(
            "cfg_negative_prompts_cropped",
            [
                {"prompt": "a drum loop", "negative_prompt": "low quality"},
                {"prompt": "rain on a tin roof", "negative_prompt": "hum"},
            ],
            params(audio_start_in_s=0.25, audio_end_in_s=0.9, guidance_scale=5.0),
            seeds=[3, 4],
        ),
        # One prompt with a negative prompt and one without share a batch.
        ConformanceScenario(
            "cfg_mixed_negative_prompts",
            [{"prompt": "a dog barking", "negative_prompt": "music"}, "birdsong"],
            params(audio_end_in_s=0.5),
            seeds=[5, 6],
        ),
        ConformanceScenario(
            "no_cfg_two_outputs_per_prompt",
            ["a hammer hitting wood"],
            params(guidance_scale=1.0, num_outputs_per_prompt=2),
            seeds=[7],
        ),
        # Defaults: the checkpoint's steps (4), diffusers' guidance 7 and the whole window.
        ConformanceScenario(
            "model_defaults", ["wind"], OmniDiffusionSamplingParams(output_type="pt"), seeds=[8]
        ),
    ]


CONFORMANCE_CASES.append(
    # Measured (fp32, CPU): 0.0 in every scenario but cfg_mixed_negative_prompts, 3.0e-6 (one batch
    # against one reference call per prompt).
    # Step caches: the SDE solver injects fresh noise every step, and over 4 steps (sigma 500 -> 0.3)
    # the first block's input changes by more than 100% per step, so cache_dit never finds a step to
    # reuse; over 8 steps it does (1 step, rel. L2 0.013), while TeaCache with its cap-free threshold
    # reuses 6 of 8 steps and lands at 0.25 from the uncached waveform.
    ConformanceCase(
        "stable-audio", _stable_audio_scenarios(), run_stable_audio_reference,
        parallel_scenario="cfg_negative_prompts_cropped", cache_steps=8, cache_max_rel_l2=0.3,
    )
)


# -- Stable Diffusion 3 / 3.5 -------------------------------------------------------------------------
# Measured max-abs differences (fp32, CPU) are noted per case.


def run_sd3_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    from diffusers import StableDiffusion3Pipeline

    from diffserve.models.spec import DEFAULTS_KEY
    from diffserve.registry import read_model_index

    pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sp = scenario.params
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in scenario.prompts]
    negatives = [p.get("negative_prompt") for p in prompts]
    # Unset parameters take the checkpoint's defaults (the tiny ones run small), else diffusers' own,
    # which are ours.
    checkpoint_defaults = read_model_index(path).get(DEFAULTS_KEY, {})
    optional = {
        "height": sp.height,
        "width": sp.width,
        "num_inference_steps": sp.num_inference_steps,
        "guidance_scale": sp.guidance_scale,
        "max_sequence_length": sp.max_sequence_length,
        "skip_guidance_layers": list(sp.skip_guidance_layers) if sp.skip_guidance_layers else None,
        "skip_layer_guidance_scale": sp.skip_layer_guidance_scale,
        "skip_layer_guidance_start": sp.skip_layer_guidance_start,
        "skip_layer_guidance_stop": sp.skip_layer_guidance_stop,
    }
    return pipe(
        prompt=[p["prompt"] for p in prompts],
        negative_prompt=[n or "" for n in negatives] if any(n is not None for n in negatives) else None,
        num_images_per_prompt=sp.num_outputs_per_prompt,
        generator=_generators(scenario),
        output_type="pt",
        **{name: checkpoint_defaults[name] for name, value in optional.items() if value is None and name in
           checkpoint_defaults},
        **{name: value for name, value in optional.items() if value is not None},
    ).images


def _sd3_scenarios(with_model_defaults: bool = False) -> list[ConformanceScenario]:
    def params(**kw):
        # 77 CLIP + 19 T5 tokens = 96 text tokens, and 32x48 pixels = 8x12 patches: both divide by 4, so
        # the parallel tests' Ulysses x ring (4 ranks) can split them.
        return OmniDiffusionSamplingParams(**{"num_inference_steps": 3, "max_sequence_length": 19, "output_type": "pt",
                                              **kw})

    scenarios = [
        ConformanceScenario(
            "cfg_batch2_nonsquare",
            [{"prompt": "a red fox in snow", "negative_prompt": "blurry"}, "a blue car"],
            params(height=32, width=48, guidance_scale=4.5),
            seeds=[0, 1],
        ),
        ConformanceScenario(
            "no_cfg_two_outputs_per_prompt",
            ["a castle on a hill"],
            params(height=48, width=32, guidance_scale=1.0, num_outputs_per_prompt=2),
            seeds=[7],
        ),
        # Of 4 steps, SLG runs on 1 and 2 (0.01 * 4 < i < 0.6 * 4): the window is exercised both ways.
        # Block 1 is a dual-attention block in sd3.5-medium.
        ConformanceScenario(
            "skip_layer_guidance_batch2",
            [{"prompt": "a lighthouse at dusk", "negative_prompt": "low quality"}, "a bowl of fruit"],
            params(height=32, width=32, guidance_scale=5.0, num_inference_steps=4, skip_guidance_layers=(1,),
                   skip_layer_guidance_scale=2.0, skip_layer_guidance_stop=0.6),
            seeds=[3, 4],
        ),
    ]
    if with_model_defaults:
        # The tiny checkpoint's 32x32 and 4 steps (model_index.json), SD3's guidance 7.0 and 256 T5 tokens.
        scenarios.append(
            ConformanceScenario("model_defaults", ["a purple flower"], OmniDiffusionSamplingParams(output_type="pt"),
                                seeds=[5])
        )
    return scenarios


# tests/distributed/test_parallel.py runs "sd3" (SD3.5-large-like) and "sd3.5-medium" (dual attention);
# sd3-medium (no q/k norm) shares the "sd3" family name there. The parallel scenario runs no skip-layer
# guidance because the cache tests use it too (a step cache refuses SLG); SLG under CFG parallel is
# tested in tests/models/sd3/test_pipeline_sd3.py.
CONFORMANCE_CASES.extend(
    [
        # Measured (2026-11-30): 0.0 on every scenario (the same float32 operations in the same order).
        ConformanceCase("sd3", _sd3_scenarios(with_model_defaults=True), run_sd3_reference,
                        parallel_scenario="cfg_batch2_nonsquare"),
        # Measured: 0.0 on every scenario.
        ConformanceCase("sd3.5-medium", _sd3_scenarios(), run_sd3_reference, parallel_scenario="cfg_batch2_nonsquare"),
        # Measured: 0.0 on every scenario.
        ConformanceCase("sd3-medium", _sd3_scenarios(), run_sd3_reference, parallel_scenario="cfg_batch2_nonsquare"),
    ]
)


# -- Qwen-Image, Qwen-Image-Edit, Qwen-Image-Edit-Plus -------------------------------------------------
# The edit checkpoints' tiny VAE compresses 16x, so sizes are multiples of 32. Every input image is
# encoded at about 1024 x 1024 pixels: a 64x48 input gives 1184x896 pixels, 37 x 28 = 1036 reference
# tokens. Sizes are chosen so that the image tokens (output + references) divide by 4, the largest
# sequence-parallel degree of tests/distributed/test_parallel.py (text lengths need not: the
# sequence-parallel hooks pad the text with masked positions).


def run_qwen_image_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    """diffusers' QwenImagePipeline / QwenImageEditPipeline / QwenImageEditPlusPipeline (from
    model_index.json). Text-to-image runs the batch as one call; the edit pipelines run one call per
    prompt, as their batch semantics differ (Edit-Plus takes one prompt; Edit gives a list of images
    to the text encoder unresized), and a batch must equal its prompts run alone."""
    import diffusers

    from diffserve.models.qwen_image.processor import load_qwen2vl_processor
    from diffserve.registry import read_model_index

    class_name = read_model_index(path)["_class_name"]
    components = {}
    if class_name != "QwenImagePipeline":
        components["processor"] = load_qwen2vl_processor(f"{path}/processor")
    pipe = getattr(diffusers, class_name).from_pretrained(path, torch_dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)
    sp = scenario.params
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in scenario.prompts]
    kwargs = dict(
        height=sp.height,
        width=sp.width,
        num_inference_steps=sp.num_inference_steps,
        num_images_per_prompt=sp.num_outputs_per_prompt,
        output_type="pt",
    )
    if sp.true_cfg_scale is not None:  # else diffusers' default (4.0), used with a negative prompt
        kwargs["true_cfg_scale"] = sp.true_cfg_scale
    if sp.max_sequence_length is not None:
        kwargs["max_sequence_length"] = sp.max_sequence_length

    def call(group: list[dict], seeds: list[int]) -> torch.Tensor:
        negatives = [p.get("negative_prompt") for p in group]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        extra = {}
        if "image" in group[0]:
            image = group[0]["image"]
            extra["image"] = image[0] if isinstance(image, list) and class_name == "QwenImageEditPipeline" else image
        return pipe(
            prompt=[p["prompt"] for p in group],
            negative_prompt=negatives if any(n is not None for n in negatives) else None,
            generator=gens[0] if len(gens) == 1 else gens,
            **extra,
            **kwargs,
        ).images

    if class_name == "QwenImagePipeline":
        return call(prompts, scenario.seeds)
    return torch.cat([call([p], [s]) for p, s in zip(prompts, scenario.seeds)])


def _qwen_params(**kw) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(**{"num_inference_steps": 3, "output_type": "pt", **kw})


def _qwen_image_scenarios() -> list[ConformanceScenario]:
    return [
        # Prompts of different lengths: the shorter is padded and masked.
        ConformanceScenario(
            "batch2_nonsquare", ["a red fox in snow", "a small blue car parked by the sea"],
            _qwen_params(height=64, width=48), seeds=[0, 1],
        ),
        # true_cfg_scale left to the model: diffusers' 4.0, since the prompts bring negative prompts.
        ConformanceScenario(
            "default_true_cfg_batch2",
            [
                {"prompt": "a red fox in snow", "negative_prompt": "blurry"},
                {"prompt": "a small blue car parked by the sea", "negative_prompt": "low quality, dark"},
            ],
            _qwen_params(height=48, width=64),
            seeds=[3, 4],
        ),
        ConformanceScenario(
            "true_cfg_scale_short_text_two_outputs",
            [{"prompt": "a castle", "negative_prompt": " "}],
            _qwen_params(height=32, width=32, true_cfg_scale=2.5, max_sequence_length=120, num_outputs_per_prompt=2),
            seeds=[7],
        ),
    ]


def _qwen_image_edit_scenarios() -> list[ConformanceScenario]:
    first, second = sample_image(64, 48, 0), sample_image(64, 48, 1)
    return [
        ConformanceScenario(
            "true_cfg_batch2_nonsquare",
            [
                {"prompt": "make the sky purple", "negative_prompt": "blurry", "image": first},
                {"prompt": "add a small red boat", "negative_prompt": "low quality", "image": second},
            ],
            _qwen_params(height=96, width=128, true_cfg_scale=3.0),
            seeds=[0, 1],
        ),
        ConformanceScenario(
            "no_cfg_batch2", [{"prompt": "make it snow", "image": first}, {"prompt": "a cat", "image": second}],
            _qwen_params(height=128, width=96), seeds=[2, 3],
        ),
        # No height/width: the input's aspect ratio at about 1024 x 1024 pixels (1184x896 here).
        ConformanceScenario(
            "size_from_image", [{"prompt": "turn it into a watercolor", "image": first}],
            _qwen_params(num_inference_steps=2), seeds=[5],
        ),
    ]


def _qwen_image_edit_plus_scenarios() -> list[ConformanceScenario]:
    wide = [sample_image(64, 48, 0), sample_image(48, 64, 1)]
    other = [sample_image(64, 48, 2), sample_image(48, 64, 3)]
    return [
        ConformanceScenario(
            "two_images_true_cfg_batch2",
            [
                {"prompt": "the cat from picture 1 in picture 2", "negative_prompt": "blurry", "image": wide},
                {"prompt": "swap the colours", "negative_prompt": "low quality", "image": other},
            ],
            _qwen_params(height=96, width=128),
            seeds=[0, 1],
        ),
        ConformanceScenario(
            "two_images_no_cfg_batch2",
            [{"prompt": "combine them", "image": wide}, {"prompt": "picture 2 on the left", "image": other}],
            _qwen_params(height=128, width=96), seeds=[2, 3],
        ),
        # No height/width: the last image sizes the output (48x64 -> 896x1184 pixels).
        ConformanceScenario(
            "size_from_last_image", [{"prompt": "make both red", "image": [sample_image(64, 64, 4), wide[1]]}],
            _qwen_params(num_inference_steps=2), seeds=[5],
        ),
    ]


# Measured max-abs differences (fp32, CPU, 2026-11-30) are noted per case: float32 rounding in the
# transformer (below 1e-6 per call), amplified by the tiny VAE decoders.
CONFORMANCE_CASES.extend(
    [
        # 4.5e-6 (batch2_nonsquare), 6.0e-6 (default_true_cfg_batch2), 4.5e-6 (short text, two outputs).
        ConformanceCase(
            "qwen-image", _qwen_image_scenarios(), run_qwen_image_reference,
            parallel_scenario="default_true_cfg_batch2", family="qwen-image",
        ),
        # 5.2e-6 (true CFG), 5.3e-6 (no CFG), 1.0e-5 (size from the image, 896x1184). Step caches run
        # 6 steps: in 4, DBCache's permissive threshold never let the tiny edit model skip one.
        ConformanceCase(
            "qwen-image-edit", _qwen_image_edit_scenarios(), run_qwen_image_reference,
            parallel_scenario="true_cfg_batch2_nonsquare", family="qwen-image-edit", cache_steps=6,
        ),
        # 5.8e-6 (two images, true CFG), 9.1e-6 (no CFG), 8.1e-6 (size from the last image).
        ConformanceCase(
            "qwen-image-edit-plus", _qwen_image_edit_plus_scenarios(), run_qwen_image_reference,
            parallel_scenario="two_images_true_cfg_batch2", family="qwen-image-edit-plus",
        ),
    ]
)


# -- Pipelines served through the diffusers adapter ----------------------------------------------------
# diffserve has no native port of these: the checkpoint's _class_name is not registered, so the engine
# serves diffusers' own pipeline (diffserve.models.diffusers_adapter). The reference calls diffusers
# directly, as a user would: one CPU generator per prompt (a lone generator for one prompt), the
# checkpoint's defaults (model_index.json's _diffserve_defaults) for unset parameters, diffusers' own
# for the rest. A negative prompt that diffusers fills with its default ("" for PixArt) shares a call;
# otherwise prompts with and without one run as one call each, which a batch must equal.


def _prompt_dicts(scenario: ConformanceScenario) -> list[dict]:
    return [p if isinstance(p, dict) else {"prompt": p} for p in scenario.prompts]


def _checkpoint_value(path: str, sp: OmniDiffusionSamplingParams, name: str):
    from diffserve.models.spec import DEFAULTS_KEY
    from diffserve.registry import read_model_index

    value = getattr(sp, name)
    return value if value is not None else read_model_index(path).get(DEFAULTS_KEY, {}).get(name)


def _diffusers_pipeline(path: str):
    import diffusers

    from diffserve.registry import read_model_index

    pipe = getattr(diffusers, read_model_index(path)["_class_name"]).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_per_negative_group(scenario: ConformanceScenario, call) -> torch.Tensor:
    """`call(prompts, seeds)` once for all prompts if they all have a negative prompt or none does,
    else once per prompt."""
    prompts = _prompt_dicts(scenario)
    if len({"negative_prompt" in p for p in prompts}) == 1:
        return call(prompts, scenario.seeds)
    return torch.cat([call([p], [s]) for p, s in zip(prompts, scenario.seeds)])


def _reference_generators(seeds: list[int]):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return gens[0] if len(gens) == 1 else gens


def run_pixart_sigma_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    pipe = _diffusers_pipeline(path)
    sp = scenario.params
    prompts = _prompt_dicts(scenario)
    return pipe(
        prompt=[p["prompt"] for p in prompts],
        # PixArt's own default negative prompt is "".
        negative_prompt=[p.get("negative_prompt", "") for p in prompts],
        height=_checkpoint_value(path, sp, "height"),
        width=_checkpoint_value(path, sp, "width"),
        num_inference_steps=_checkpoint_value(path, sp, "num_inference_steps"),
        guidance_scale=4.5 if sp.guidance_scale is None else sp.guidance_scale,
        num_images_per_prompt=sp.num_outputs_per_prompt,
        generator=_reference_generators(scenario.seeds),
        output_type="pt",
    ).images


def _adapter_image_scenarios() -> list[ConformanceScenario]:
    def params(**kw):
        return OmniDiffusionSamplingParams(**{"num_inference_steps": 3, "output_type": "pt", **kw})

    return [
        ConformanceScenario(
            "cfg_batch2_nonsquare",
            [{"prompt": "a red fox in snow", "negative_prompt": "blurry"},
             {"prompt": "a blue car", "negative_prompt": "low quality"}],
            params(height=32, width=48, guidance_scale=4.0),
            seeds=[0, 1],
        ),
        # diffusers fills the missing negative prompt with its default (""): one call.
        ConformanceScenario(
            "cfg_mixed_negative_prompts",
            [{"prompt": "a castle", "negative_prompt": "fog"}, "a lighthouse"],
            params(height=48, width=32),
            seeds=[3, 4],
        ),
        ConformanceScenario(
            "no_cfg_two_outputs_per_prompt", ["a castle"], params(height=32, width=32, guidance_scale=1.0,
                                                                   num_outputs_per_prompt=2), seeds=[7]
        ),
        # Size and steps from the checkpoint, guidance from PixArt's __call__ (4.5).
        ConformanceScenario("model_defaults", ["a tree"], OmniDiffusionSamplingParams(output_type="pt"), seeds=[5]),
    ]


def run_ltx_video_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    pipe = _diffusers_pipeline(path)
    sp = scenario.params

    def call(prompts: list[dict], seeds: list[int]) -> torch.Tensor:
        negatives = [p["negative_prompt"] for p in prompts if "negative_prompt" in p]
        return pipe(
            prompt=[p["prompt"] for p in prompts],
            negative_prompt=negatives or None,
            height=_checkpoint_value(path, sp, "height"),
            width=_checkpoint_value(path, sp, "width"),
            num_frames=_checkpoint_value(path, sp, "num_frames"),
            num_inference_steps=_checkpoint_value(path, sp, "num_inference_steps"),
            guidance_scale=3.0 if sp.guidance_scale is None else sp.guidance_scale,
            frame_rate=25 if sp.fps is None else sp.fps,
            num_videos_per_prompt=sp.num_outputs_per_prompt,
            generator=_reference_generators(seeds),
            output_type="pt",
        ).frames

    return _run_per_negative_group(scenario, call)


def _adapter_video_scenarios() -> list[ConformanceScenario]:
    def params(**kw):
        return OmniDiffusionSamplingParams(**{"num_inference_steps": 3, "output_type": "pt", **kw})

    return [
        ConformanceScenario(
            "cfg_batch2_nonsquare",
            [{"prompt": "a cat surfing a wave", "negative_prompt": "blurry"},
             {"prompt": "a red car at night", "negative_prompt": "low quality"}],
            params(height=32, width=64, num_frames=9, guidance_scale=4.0),
            seeds=[0, 1],
        ),
        # LTX takes no negative prompt for some prompts only: two diffusers calls.
        ConformanceScenario(
            "cfg_mixed_negative_prompts_fps",
            [{"prompt": "waves roll in", "negative_prompt": "static"}, "a bird flies away"],
            params(height=64, width=32, num_frames=5, fps=16),
            seeds=[3, 4],
        ),
        ConformanceScenario(
            "no_cfg_two_outputs_per_prompt", ["a dog running"],
            params(guidance_scale=1.0, num_outputs_per_prompt=2), seeds=[7],
        ),
    ]


def run_audioldm2_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    pipe = _diffusers_pipeline(path)
    sp = scenario.params

    def call(prompts: list[dict], seeds: list[int]) -> torch.Tensor:
        negatives = [p["negative_prompt"] for p in prompts if "negative_prompt" in p]
        audio = pipe(
            prompt=[p["prompt"] for p in prompts],
            negative_prompt=negatives or None,
            audio_length_in_s=sp.audio_end_in_s,
            num_inference_steps=_checkpoint_value(path, sp, "num_inference_steps"),
            guidance_scale=3.5 if sp.guidance_scale is None else sp.guidance_scale,
            num_waveforms_per_prompt=sp.num_outputs_per_prompt,
            generator=_reference_generators(seeds),
            output_type="np",
        ).audios
        return torch.from_numpy(audio)[:, None]  # mono [N, samples] -> [N, 1, samples]

    return _run_per_negative_group(scenario, call)


def _adapter_audio_scenarios() -> list[ConformanceScenario]:
    def params(**kw):
        return OmniDiffusionSamplingParams(**{"num_inference_steps": 3, "output_type": "pt", **kw})

    return [
        ConformanceScenario(
            "cfg_batch2",
            [{"prompt": "a drum loop", "negative_prompt": "low quality"}, {"prompt": "rain", "negative_prompt": "hum"}],
            params(guidance_scale=4.0),
            seeds=[0, 1],
        ),
        # audio_end_in_s is AudioLDM2's audio_length_in_s; mixed negative prompts: two calls.
        ConformanceScenario(
            "cfg_mixed_negative_prompts_length",
            [{"prompt": "a dog barking", "negative_prompt": "music"}, "birdsong"],
            params(audio_end_in_s=1.28),
            seeds=[5, 6],
        ),
        ConformanceScenario(
            "no_cfg_two_outputs_per_prompt", ["a hammer hitting wood"],
            params(guidance_scale=1.0, num_outputs_per_prompt=2), seeds=[7],
        ),
    ]


# Measured (fp32, CPU, 2026-11-30): pixart-sigma 1.2e-7 (cfg_batch2_nonsquare, cfg_mixed_negative_prompts,
# no_cfg_two_outputs_per_prompt), 0.0 (model_defaults); ltx-video 0.0 in every scenario; audioldm2 0.0 in
# every scenario. Tolerance 1e-4.
CONFORMANCE_CASES.extend(
    [
        ConformanceCase("pixart-sigma", _adapter_image_scenarios(), run_pixart_sigma_reference, backend="diffusers",
                        cache_backends=("cache_dit",)),
        ConformanceCase("ltx-video", _adapter_video_scenarios(), run_ltx_video_reference, backend="diffusers",
                        cache_backends=("cache_dit",)),
        # cache-dit knows no AudioLDM2 (a UNet): no step cache.
        ConformanceCase("audioldm2", _adapter_audio_scenarios(), run_audioldm2_reference, backend="diffusers",
                        cache_backends=()),
    ]
)
