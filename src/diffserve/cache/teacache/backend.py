"""TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
CVPR 2025) as a diffserve cache backend.

Every transformer with block lists of patterns 0-3 (diffserve.cache.blocks) supports it. A
transformer calibrates it by declaring
- `_teacache_modulated_input(first_block, *block_args, **block_kwargs) -> Tensor`: the first block's
  timestep-modulated input, computed from the arguments that block is called with (default: the first
  block's input hidden states);
- `_teacache_coefficients`: the rescale polynomial (highest power first) fitted for the model with
  scripts/fit_teacache_coefficients.py or published by the TeaCache authors, with a comment naming
  where it comes from (default: none, the raw relative L1 distance; a user may override it with
  cache_config["coefficients"]).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from diffserve.cache.base import CacheBackend, check_cfg_runs_in_one_call, denoisers
from diffserve.cache.blocks import cache_block_lists
from diffserve.cache.config import TeaCacheConfig, resolve_for
from diffserve.cache.teacache.cfg_truncation import CFGTruncation
from diffserve.cache.teacache.hook import RowGroup, StepCounter, TeaCacheHook, TeaCacheMemory

logger = logging.getLogger(__name__)

# Residual replay needs every returned stream to be an input too (patterns 4 and 5 create one).
REPLAYABLE_PATTERNS = ("Pattern_0", "Pattern_1", "Pattern_2", "Pattern_3")


# Without fitted coefficients the distance is used as it is (the polynomial x).
IDENTITY_COEFFICIENTS = (1.0, 0.0)


def first_block_input(block: nn.Module, hidden_states, *args, **kwargs):
    """The default signal: what the first block receives (models declare their modulated input)."""
    return hidden_states


def build_hook(path: str, transformer: nn.Module, config: TeaCacheConfig, counter: StepCounter) -> TeaCacheHook:
    """The hook for one transformer, or a ValueError saying why its blocks cannot be skipped. Fields
    the user left unset come from the transformer's `_cache_defaults["tea_cache"]`."""
    name = type(transformer).__name__
    config = resolve_for(config, transformer)
    modulated_input = getattr(transformer, "_teacache_modulated_input", first_block_input)
    coefficients = config.coefficients or getattr(transformer, "_teacache_coefficients", None)
    if coefficients is None:
        logger.warning(
            "TeaCache on %s (%s) is uncalibrated: the model declares no _teacache_coefficients, so the raw "
            "relative L1 change of its first block's input decides (fit coefficients with "
            "scripts/fit_teacache_coefficients.py, and tune rel_l1_thresh)", name, path,
        )
        coefficients = IDENTITY_COEFFICIENTS
    block_lists = cache_block_lists(transformer)
    for lst in block_lists:
        if lst.pattern not in REPLAYABLE_PATTERNS:
            raise ValueError(
                f"cache_backend='tea_cache' cannot skip {path}.{lst.attr}: its blocks are {lst.pattern}, "
                f"and TeaCache replays residuals only for {', '.join(REPLAYABLE_PATTERNS)}"
            )
    return TeaCacheHook(
        transformer, block_lists, modulated_input, coefficients, config.rel_l1_thresh, config.warmup_steps, counter,
        max_continuous_cached_steps=config.max_continuous_cached_steps,
        forecast_order=config.taylorseer_order if config.calibrator == "taylorseer" else 0,
        reuse_output=config.reuse == "output", compute_last_step=config.compute_last_step,
        fixed_schedule=config.fixed_schedule, tag=config.strify(),
    )


class TeaCacheBackend(CacheBackend):
    name = "tea_cache"

    def __init__(self, config: TeaCacheConfig):
        if not isinstance(config, TeaCacheConfig):
            raise TypeError(f"TeaCacheBackend takes a TeaCacheConfig, got {type(config).__name__}")
        super().__init__(config)
        self.counter = StepCounter()
        self.hooks: list[TeaCacheHook] = []
        self.truncation: CFGTruncation | None = None
        # batching="step": each running request's step counter and memory per hook, by request id.
        self._requests: dict[str, tuple[StepCounter, list[TeaCacheMemory]]] = {}

    def enable(self, pipeline: nn.Module) -> None:
        if self._enabled:
            raise RuntimeError("TeaCache is already enabled on this pipeline")
        check_cfg_runs_in_one_call(pipeline, self.name)
        # Every check first: a refused model is left untouched.
        hooks = [build_hook(path, t, self.config, self.counter) for path, t in denoisers(pipeline).items()]
        if self.config.cfg_truncation_step >= 0:
            self.truncation = CFGTruncation(pipeline, self.config.cfg_truncation_step, self.counter)
            self.truncation.install()
        for hook in hooks:
            hook.install()
        self.hooks = hooks
        self._enabled = True
        logger.info(
            "TeaCache enabled successfully on %s (%s)", type(pipeline).__name__,
            ", ".join(f"{path}: {hook.tag}" for path, hook in zip(denoisers(pipeline), hooks)),
        )

    def refresh(self, pipeline: nn.Module, num_inference_steps: int | None) -> None:
        if not self._enabled:
            raise RuntimeError("refresh() before enable()")
        self.counter.reset(num_inference_steps, getattr(pipeline, "scheduler", None))
        for hook in self.hooks:
            hook.reset()

    def disable(self, pipeline: nn.Module) -> None:
        for hook in self.hooks:
            hook.remove()
        if self.truncation is not None:
            self.truncation.remove()
        self.hooks, self.truncation, self._enabled = [], None, False

    def cached_steps(self) -> int:
        return len(self.counter.cached_steps)

    # -- batching="step": one counter and memory per running request ---------------------------------

    def begin_request(self, request_id: str, num_inference_steps: int | None, scheduler: Any) -> None:
        counter = StepCounter()
        # As refresh() for a request run alone, with the request's own scheduler copy.
        counter.reset(num_inference_steps, scheduler)
        self._requests[request_id] = (counter, [TeaCacheMemory() for _ in self.hooks])

    def select_requests(self, layout: list[tuple[str, torch.Tensor]] | None) -> None:
        for i, hook in enumerate(self.hooks):
            hook.step_groups = None if layout is None else [
                RowGroup(self._requests[rid][0], self._requests[rid][1][i], rows) for rid, rows in layout
            ]

    def finish_request(self, request_id: str) -> dict[str, Any]:
        counter, _ = self._requests.pop(request_id)
        return self.metrics(len(counter.cached_steps))
