"""Any diffusers pipeline under diffserve's engine: the fallback for checkpoints with no native pipeline
(or any checkpoint, with backend="diffusers").

`DiffusersAdapterPipeline` loads the checkpoint with diffusers' `DiffusionPipeline.from_pretrained` in
the engine's dtype, registers its model components as submodules (so the engine moves, compiles and
caches them like a native pipeline's), derives its SamplingSpec from the pipeline's `__call__`
(diffserve.models.diffusers_adapter.call_plan), and runs each admitted batch as one diffusers call
(more only where diffusers cannot take the batch in one: a mix of prompts with and without negative
prompts, or different input images). Seeds become one CPU generator per prompt; diffusers' per-step
callback drives diffserve's progress and the engine's abort; diffusers' own progress bar is off.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import torch
import torch.nn as nn

from diffserve.cache.cache_dit_backend import CUSTOM_DIT_ENABLERS
from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import DiffusionPipelineBase
from diffserve.models.diffusers_adapter import cache as adapter_cache
from diffserve.models.diffusers_adapter.call_plan import (
    audio_sample_rate,
    call_groups,
    call_kwargs,
    denoiser_names,
    derive_call_plan,
    derive_spec,
    to_float_output,
)
from diffserve.models.spec import SamplingSpec
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)

# diffserve's attention backend -> diffusers' name for the same kernels (sdpa is diffusers' default).
DIFFUSERS_ATTENTION_BACKENDS = {"flash_attn": "flash"}


def load_diffusers_pipeline(od_config: OmniDiffusionConfig):
    """diffusers' pipeline for the checkpoint in the engine's dtype (on the CPU; the loader moves it),
    with diffusers' loading bars off when diffserve's progress bars are."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    quiet = od_config.disable_progress_bar and diffusers_logging.is_progress_bar_enabled()
    if quiet:
        diffusers_logging.disable_progress_bar()
    try:
        return DiffusionPipeline.from_pretrained(od_config.model, dtype=od_config.torch_dtype)
    finally:
        if quiet:
            diffusers_logging.enable_progress_bar()


class DiffusersAdapterPipeline(DiffusionPipelineBase):
    # Filled per instance from the diffusers pipeline's components.
    _dit_modules: ClassVar[list[str]] = []
    _encoder_modules: ClassVar[list[str]] = []
    _vae_modules: ClassVar[list[str]] = []

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        pipe = load_diffusers_pipeline(od_config)
        pipe.set_progress_bar_config(disable=True)  # diffserve reports progress itself
        self.diffusers_pipeline = pipe
        self.register_components(pipe)
        self.plan = derive_call_plan(pipe)
        self.weights_sources = []  # from_pretrained loaded every weight
        if self.plan.modality == "audio":
            self.sample_rate = audio_sample_rate(pipe)
            if self.sample_rate is None:
                raise ValueError(f"{type(pipe).__name__}: cannot find its audio sample rate (pipeline.sample_rate, "
                                 "vocoder.config.sampling_rate or vae.config.sampling_rate)")
        adapter_cache.declare_cache_blocks(pipe, self._dit_modules)
        self.apply_attention_backend()

    def register_components(self, pipe) -> None:
        """Every nn.Module component becomes a submodule under its diffusers name (shared with the
        diffusers pipeline), and the denoisers, VAEs and encoders are declared for component discovery."""
        modules = {name: c for name, c in pipe.components.items() if isinstance(c, nn.Module)}
        for name, module in modules.items():
            if hasattr(self, name):
                raise ValueError(f"{type(pipe).__name__} has a component named {name!r}, which the adapter "
                                 "uses itself; it cannot serve this pipeline")
            setattr(self, name, module)
        self._dit_modules = denoiser_names(pipe)
        self._vae_modules = [n for n in modules if "vae" in n]
        self._encoder_modules = [n for n in modules if n not in self._dit_modules and n not in self._vae_modules]

    def apply_attention_backend(self) -> None:
        """sdpa is diffusers' default; flash_attn maps to diffusers' "flash" on models whose attention
        goes through diffusers' dispatcher. The choice (and the fallback to sdpa where a kernel cannot
        run) is the engine's, as for native models."""
        from diffserve.layers.attention import select_attention_backend

        od_config = self.od_config
        chosen = select_attention_backend(od_config.attention_backend, od_config.resolved_device,
                                          od_config.torch_dtype).name
        if chosen not in DIFFUSERS_ATTENTION_BACKENDS:
            return
        for name in self._dit_modules:
            model = getattr(self, name)
            dispatched = [m for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
            if not dispatched or not hasattr(model, "set_attention_backend"):
                raise ValueError(
                    f"attention_backend={chosen!r}: {type(model).__name__} ({name}) does not run its attention "
                    "through diffusers' attention dispatcher, so the diffusers adapter cannot switch it; use sdpa"
                )
            model.set_attention_backend(DIFFUSERS_ATTENTION_BACKENDS[chosen])

    def enable_vae_tiling(self) -> None:
        """vae_use_tiling: the VAEs' own tiled decode (the engine calls this instead of its own tiling)."""
        self._enable_on_vaes("vae_use_tiling", "enable_tiling", "tiled decode")

    def enable_vae_slicing(self) -> None:
        """vae_use_slicing: the VAEs' own one-sample-at-a-time encode and decode (instead of the engine's)."""
        self._enable_on_vaes("vae_use_slicing", "enable_slicing", "sliced encode and decode")

    def _enable_on_vaes(self, setting: str, method: str, what: str) -> None:
        if not self._vae_modules:
            raise ValueError(f"{setting}: {self.spec.model} has no VAE component; leave it off")
        for name in self._vae_modules:
            vae = getattr(self, name)
            if not hasattr(vae, method):
                raise ValueError(f"{setting}: {type(vae).__name__} ({name}) has no {what} in diffusers")
            getattr(vae, method)()
            logger.info("%s (%s): diffusers' %s", name, type(vae).__name__, what)

    def sampling_spec(self) -> SamplingSpec:
        spec = derive_spec(self.diffusers_pipeline, self.plan)
        if self.od_config.cache_backend is not None and "skip_guidance_layers" in spec.params:
            # As for the native SD3: a step cache cannot follow skip-layer guidance's extra transformer call.
            spec = spec.replace(unavailable={"skip_guidance_layers": (
                "skip-layer guidance makes an extra transformer call on some steps, which the step cache "
                f"(cache_backend={self.od_config.cache_backend!r}) cannot follow; run without a cache to use it")})
        return spec

    # -- the call -----------------------------------------------------------------------------------

    def forward(self, req: OmniDiffusionRequest) -> DiffusionOutput:
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        groups = call_groups(req, self.plan)
        per_prompt: list[Any] = [None] * len(req.prompts)
        steps = StepReporter(self, calls=len(groups), steps_per_call=sp.num_inference_steps)
        try:
            for group in groups:
                kwargs = {**call_kwargs(self.plan, req, group), **steps.callback_kwargs()}
                result = steps.timed_call(self.diffusers_pipeline, kwargs)
                value = getattr(result, self.plan.output_field)
                for j, i in enumerate(group):  # prompt-major, k outputs per prompt
                    per_prompt[i] = value[j * k:(j + 1) * k]
        finally:
            steps.close()
        metrics: dict[str, Any] = {**steps.timings, "num_inference_steps": sp.num_inference_steps}
        if self.plan.modality == "video":
            metrics.update(num_frames=sp.num_frames, fps=sp.fps)
        if self.plan.modality == "audio":
            metrics["sample_rate"] = self.sample_rate
        if sp.output_type == "latent":
            return DiffusionOutput(output=torch.cat([torch.as_tensor(v) for v in per_prompt]), metrics=metrics)
        output = torch.cat([to_float_output(v, self.plan.modality) for v in per_prompt])
        return DiffusionOutput(output=output, metrics=metrics)


class StepReporter:
    """diffusers' per-step callback as diffserve's progress: the progress bar and the engine's step
    callback (which raises to stop an aborted request: the exception leaves diffusers' loop), plus stage
    times: `encode_denoise_s` (each call's start to its last step, one device sync there) and `decode_s`
    (the rest of the call: decoding and diffusers' post-processing)."""

    def __init__(self, pipeline: DiffusersAdapterPipeline, calls: int, steps_per_call: int | None):
        self.pipeline = pipeline
        self.calls = calls
        self.steps_per_call = steps_per_call
        self.progress = None
        self.done_in_call = 0
        self.total_in_call: int | None = None
        self.last_step_at: float | None = None
        self.timings = {"diffusers_call_s": 0.0}

    def callback_kwargs(self) -> dict[str, Any]:
        mode = self.pipeline.plan.step_callback
        if mode == "on_step_end":
            return {"callback_on_step_end": self.on_step_end, "callback_on_step_end_tensor_inputs": []}
        if mode == "legacy":
            return {"callback": self.on_legacy_step, "callback_steps": 1}
        return {}

    def on_step_end(self, pipe, index: int, timestep, tensors: dict) -> dict:
        self.step(getattr(pipe, "_num_timesteps", None))
        return {}  # change no tensor

    def on_legacy_step(self, index: int, timestep, latents) -> None:
        self.step(None)

    def step(self, total_in_call: int | None) -> None:
        if self.total_in_call is None:
            self.total_in_call = total_in_call or self.steps_per_call or 1
        if self.progress is None:
            self.progress = self.pipeline.progress_bar(total=self.calls * self.total_in_call)
        self.done_in_call += 1
        if self.done_in_call == self.total_in_call:
            self.sync()
            self.last_step_at = time.perf_counter()
        self.progress.update()

    def sync(self) -> None:
        device = self.pipeline.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_call(self, pipe, kwargs: dict[str, Any]):
        self.done_in_call, self.last_step_at = 0, None
        start = time.perf_counter()
        result = pipe(**kwargs)
        self.sync()
        end = time.perf_counter()
        self.timings["diffusers_call_s"] += end - start
        if self.last_step_at is not None:
            for key, seconds in (("encode_denoise_s", self.last_step_at - start), ("decode_s", end - self.last_step_at)):
                self.timings[key] = self.timings.get(key, 0.0) + seconds
        return result

    def close(self) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)


CUSTOM_DIT_ENABLERS[DiffusersAdapterPipeline.__name__] = adapter_cache.enable_cache_dit
