"""The base every native pipeline derives from: what is shared lives here once.

A pipeline subclasses `DiffusionPipelineBase`, builds its components in `__init__`, declares what it
takes in `sampling_spec()`, and writes `forward(req)` as named stages. The engine has already
admitted the request against that spec (diffserve.engine.admission): every sampling parameter the
model takes is resolved (defaults filled, sizes checked), so `forward` reads them as they are.

Provided here: CFG (CFGParallelMixin, and the one rule for whether it is on), the progress bar and
step callback, component discovery (device/dtype from the first denoiser), prompt tokenization
with a truncation warning, negative prompts, and per-stage timing.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from diffserve.config import OmniDiffusionConfig
from diffserve.distributed.cfg_parallel import CFGParallelMixin
from diffserve.loader import AutoWeightsLoader
from diffserve.models.denoise import DenoiseState, run_to_end
from diffserve.models.interface import SupportsComponentDiscovery
from diffserve.models.progress_bar import ProgressBarMixin
from diffserve.models.spec import DEFAULTS_KEY, SamplingSpec
from diffserve.models.stage_timer import StageTimer
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class PipelineRun:
    """One request between `begin` and `finish`: its denoising state, its stage timings, the metrics
    its output reports that `begin` already knows, and what else `finish` needs from `begin`."""

    req: OmniDiffusionRequest
    state: DenoiseState
    timer: StageTimer
    metrics: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)


class DiffusionPipelineBase(nn.Module, CFGParallelMixin, ProgressBarMixin, SupportsComponentDiscovery):
    _dit_modules: ClassVar[list[str]] = ["transformer"]

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__()
        self.od_config = od_config
        self.set_progress_bar_config(disable=od_config.disable_progress_bar)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype latents and embeddings follow (the config's: a quantized denoiser stores
        some weights in another dtype)."""
        return self.od_config.torch_dtype

    # -- the declaration ----------------------------------------------------------------------------

    def sampling_spec(self) -> SamplingSpec:
        """What this loaded model takes and makes; see diffserve.models.spec."""
        raise NotImplementedError(f"{type(self).__name__} must implement sampling_spec()")

    @functools.cached_property
    def spec(self) -> SamplingSpec:
        """`sampling_spec()`, with the checkpoint's own defaults (model_index.json DEFAULTS_KEY) applied."""
        name = type(self).__name__
        spec = self.sampling_spec()
        if getattr(self, "support_image_input", False) and not spec.takes_images:
            raise TypeError(f"{name} is marked SupportImageInput but its SamplingSpec takes no images")
        overrides = self.od_config.model_config.get(DEFAULTS_KEY, {})
        unknown = sorted(set(overrides) - spec.accepted_params)
        if unknown:
            raise ValueError(
                f"{self.od_config.model}: model_index.json {DEFAULTS_KEY} sets {unknown}, which {name} does not "
                f"take; it takes: {', '.join(sorted(spec.accepted_params))}"
            )
        spec = spec.replace(model=spec.model or name, defaults={**spec.defaults, **overrides})
        if self.od_config.lora_modules:  # every model built from our linear layers takes adapters
            spec = spec.replace(params=spec.params | {"lora"}, lora_adapters=frozenset(self.od_config.lora_modules))
        return spec

    # -- the call as stages: begin + denoise + finish ------------------------------------------------
    # A pipeline that implements `begin` and `finish` (and sets this) has one code path for both
    # batching modes: `forward` below runs a request alone; under batching="step" the engine runs
    # `begin`, steps the states of compatible running requests together (denoise.denoise_step), and
    # `finish`es each when its steps are done.
    supports_step_batching: ClassVar[bool] = False
    # Text inputs whose length may differ between requests stepped together, each with its attention
    # mask input ({sequence: mask}): they are padded to the longest and masked (denoise.denoise_step).
    step_padded_inputs: ClassVar[dict[str, str]] = {}

    def begin(self, req: OmniDiffusionRequest) -> PipelineRun:
        """Encode the prompts and prepare the latents, timesteps and fixed transformer inputs."""
        raise NotImplementedError(f"{type(self).__name__} does not split its call into begin/finish")

    def finish(self, run: PipelineRun) -> DiffusionOutput:
        """The output of a run whose steps are done (decoded unless output_type is "latent")."""
        raise NotImplementedError(f"{type(self).__name__} does not split its call into begin/finish")

    def forward(self, req: OmniDiffusionRequest) -> DiffusionOutput:
        run = self.begin(req)
        with run.timer.stage("denoise"):
            run_to_end(self, run.state)
        return self.finish(run)

    # -- shared input handling ----------------------------------------------------------------------

    def cfg_enabled(self, req: OmniDiffusionRequest) -> bool:
        from diffserve.engine.admission import cfg_enabled

        return cfg_enabled(self.spec, req.sampling_params)

    @staticmethod
    def negative_prompts(req: OmniDiffusionRequest) -> list[str]:
        """Each prompt's negative prompt; "" (the unconditional caption) where it has none."""
        return [n or "" for n in req.negative_prompt_texts]

    def tokenize(self, tokenizer, prompts: list[str], max_length: int, padding: str = "max_length", **kwargs: Any):
        """Truncate to `max_length` tokens and pad (to `max_length`, or with padding="longest" to the
        longest prompt): a BatchEncoding of tensors on the CPU. Warns when a prompt loses tokens."""
        encoded = tokenizer(
            prompts, padding=padding, max_length=max_length, truncation=True, return_tensors="pt", **kwargs
        )
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, **kwargs).input_ids]
        if max(lengths) > max_length:
            remedy = "shorten it"
            if "max_sequence_length" in self.spec.params:
                remedy = f"raise max_sequence_length (at most {self.spec.max_sequence_length}) or shorten it"
            logger.warning("prompt truncated to %d tokens by %s (it had %d): %s",
                           max_length, type(tokenizer).__name__, max(lengths), remedy)
        return encoded

    def stage_timer(self) -> StageTimer:
        return StageTimer(self.device)

    # -- weights ------------------------------------------------------------------------------------

    def add_checkpoint_module(self, name: str, module_cls, config, fall_back_to_pt: bool = True) -> None:
        """Our implementation of the checkpoint's component `name` (a denoiser, say), built on the meta
        device as attribute `name`; the loader fills it from the checkpoint's `name/` folder."""
        from diffserve.loader import DiffusersPipelineLoader

        with torch.device("meta"):
            setattr(self, name, module_cls(config, od_config=self.od_config).to(self.dtype))
        source = DiffusersPipelineLoader.ComponentSource(
            model_or_path=self.od_config.model, subfolder=name, prefix=f"{name}.", fall_back_to_pt=fall_back_to_pt
        )
        self.weights_sources = [*getattr(self, "weights_sources", []), source]

    def load_weights(self, weights) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


def repeat_per_output(tensor: torch.Tensor, outputs_per_prompt: int) -> torch.Tensor:
    """[P, ...] per prompt -> [P * k, ...], prompt-major, as the pipelines' batches are laid out."""
    return tensor.repeat_interleave(outputs_per_prompt, dim=0)
