"""The offline Python API."""

from __future__ import annotations

import os
from typing import Any, Sequence

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.engine.engine import DiffusionEngine, replica_builders
from diffserve.registry import DEMO_MODEL
from diffserve.request import DiffusionOutput, OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput

PromptLike = str | dict[str, Any]


class Omni:
    """Load a model once and generate from it.

    >>> omni = Omni(model="path/to/checkpoint", dtype="bfloat16")
    >>> out = omni.generate("a fox", OmniDiffusionSamplingParams(height=512, width=512, seed=0))
    >>> out[0].images[0].save("fox.png")

    `model` is a folder in the diffusers layout, a Hugging Face hub id, or "demo" (the default): the
    built-in demo model, which draws coloured shapes on a CPU. Keywords are the fields of
    OmniDiffusionConfig and DiffusionParallelConfig; an unknown keyword is an error that names it.

    With `data_parallel_size=N` there are N replicas of the model, each on its own devices, and
    `generate` runs the batches of one call on all of them at once (`engine` is then the
    AsyncDiffusionEngine that feeds them).
    """

    def __init__(self, model: str = DEMO_MODEL, **kwargs: Any):
        self.od_config = OmniDiffusionConfig.from_kwargs(model, **kwargs)
        self.engine: DiffusionEngine | AsyncDiffusionEngine | None = None
        if self.od_config.parallel_config.data_parallel_size == 1:
            self.engine = DiffusionEngine(self.od_config)
        else:
            self.engine = start_replicas(self.od_config)

    def _live_engine(self) -> DiffusionEngine | AsyncDiffusionEngine:
        if self.engine is None:
            raise RuntimeError("this Omni instance has been closed")
        return self.engine

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: OmniDiffusionSamplingParams | Sequence[OmniDiffusionSamplingParams] | None = None,
    ) -> list[DiffusionOutput]:
        """One DiffusionOutput per prompt, in order.

        A prompt is a string or {"prompt", "negative_prompt", "image", "seed"}. `sampling_params` is one
        object for all prompts or one per prompt. A failure raises: ValueError for invalid input,
        RuntimeError for anything else.
        """
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if not prompt_list:
            raise ValueError("generate() needs at least one prompt")
        params_list = self._params_per_prompt(sampling_params, len(prompt_list))
        requests = [
            OmniDiffusionRequest(prompts=[PromptInput.from_user(p, sp)], sampling_params=sp)
            for p, sp in zip(prompt_list, params_list)
        ]
        engine = self._live_engine()
        outputs = engine.run_all(requests) if isinstance(engine, AsyncDiffusionEngine) else engine.generate(requests)
        for out in outputs:
            if out.error is not None:
                raise (ValueError if out.error_type == "invalid_request" else RuntimeError)(out.error)
        return outputs

    @staticmethod
    def _params_per_prompt(sampling_params, count: int) -> list[OmniDiffusionSamplingParams]:
        if sampling_params is None:
            return [OmniDiffusionSamplingParams()] * count
        if isinstance(sampling_params, OmniDiffusionSamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling params for {count} prompts; pass one or one per prompt")
        for sp in params:
            if not isinstance(sp, OmniDiffusionSamplingParams):
                raise TypeError(f"sampling_params must be OmniDiffusionSamplingParams, got {type(sp).__name__}")
        return params

    def start_profile(self, trace_dir: str | None = None) -> None:
        """Start a torch profiler on every worker; traces are written by stop_profile()."""
        self._live_engine().start_profile(trace_dir or self.od_config.profile_dir or os.path.abspath("diffserve_profiles"))

    def stop_profile(self) -> list[str]:
        """Stop profiling; returns the Chrome trace files written (one per rank)."""
        return self._live_engine().stop_profile()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def start_replicas(od_config: OmniDiffusionConfig) -> AsyncDiffusionEngine:
    """The data-parallel replicas behind one scheduler, all loaded (a load error is raised as it was).
    Offline, nothing waits for more requests and a long step is never declared hung."""
    engine = AsyncDiffusionEngine(replica_builders(od_config), max_queue=None, batch_wait_ms=0, step_timeout_s=None)
    engine.wait_until_all_loaded()
    if engine.load_exception is not None:
        engine.shutdown()
        raise engine.load_exception
    return engine
