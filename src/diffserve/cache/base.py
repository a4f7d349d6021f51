"""The step-cache interface the worker drives, and the checks every backend shares."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn

from diffserve.cache.config import CacheConfig
from diffserve.models.interface import discover_components

if TYPE_CHECKING:
    import torch

    from diffserve.config import OmniDiffusionConfig

logger = logging.getLogger(__name__)


class CacheBackend(ABC):
    """Skips transformer work on denoise steps whose result it can predict from earlier steps.

    The worker calls `enable(pipeline)` once after loading, `refresh(pipeline, num_inference_steps)`
    before every request (so no state crosses requests, and requests may differ in step count), and
    `request_metrics()` after it.

    Under batching="step" (diffserve.engine.step_batching) the worker instead calls
    `begin_request` when a request joins the running batch, `select_requests` around each step's
    transformer call, and `finish_request` when the request leaves: each keeps a state of its own.

    Both backends assume one call of each denoiser per denoise step on each rank: CFG branches run as
    one batch or on separate CFG-parallel ranks, never one after the other (see
    `check_cfg_runs_in_one_call`).
    """

    name: ClassVar[str]

    def __init__(self, config: CacheConfig):
        self.config = config
        self._enabled = False

    @abstractmethod
    def enable(self, pipeline: nn.Module) -> None:
        """Install the cache on the pipeline's denoisers. A failure leaves the pipeline unchanged."""

    @abstractmethod
    def refresh(self, pipeline: nn.Module, num_inference_steps: int | None) -> None:
        """Start a request: drop every cached tensor and counter. None: the pipeline's default step count."""

    @abstractmethod
    def disable(self, pipeline: nn.Module) -> None:
        """Remove what `enable` installed."""

    @abstractmethod
    def cached_steps(self) -> int:
        """Denoise steps of the last request that reused the cache (per rank; ranks agree)."""

    @abstractmethod
    def begin_request(self, request_id: str, num_inference_steps: int | None, scheduler: Any) -> None:
        """batching="step": a request joins the running batch with a fresh state of its own (what
        refresh() gives a request alone); `scheduler` is its own scheduler copy."""

    @abstractmethod
    def select_requests(self, layout: "list[tuple[str, torch.Tensor]] | None") -> None:
        """The rows of each running request in the next transformer call (diffserve.models.denoise.
        batch_rows); None after the call, so that a request run alone uses refresh()'s state."""

    @abstractmethod
    def finish_request(self, request_id: str) -> dict[str, Any]:
        """The request left the batch: its output metrics (as request_metrics()); its state is dropped."""

    def is_enabled(self) -> bool:
        return self._enabled

    def request_metrics(self) -> dict[str, Any]:
        """What the last request's output reports: the backend and its cached step count."""
        return self.metrics(self.cached_steps())

    def metrics(self, cached_steps: int) -> dict[str, Any]:
        """A request's output metrics, given its cached step count (also logged)."""
        logger.info("%s: %d denoise steps reused the cache", self.name, cached_steps)
        return {"cache_backend": self.name, "cached_steps": cached_steps}


def denoisers(pipeline: nn.Module) -> dict[str, nn.Module]:
    """The pipeline's transformers by attribute path (Wan2.2: transformer and transformer_2)."""
    dits = discover_components(pipeline)["dit"]
    if not dits:
        raise ValueError(f"{type(pipeline).__name__} has no denoiser modules to cache")
    return dits


def check_cfg_runs_in_one_call(pipeline: nn.Module, backend: str) -> None:
    """Refuse a pipeline whose CFG branches run as two transformer calls per step.

    CFGParallelMixin batches the branches when the pipeline lists its per-sample inputs in
    `cfg_batched_inputs`; with the list empty it calls the transformer twice per step, which a step
    cache would read as two steps (comparing one branch with the other).
    """
    from diffserve.distributed.cfg_parallel import CFGParallelMixin

    if isinstance(pipeline, CFGParallelMixin) and not pipeline.cfg_batched_inputs:
        raise ValueError(
            f"cache_backend={backend!r} needs {type(pipeline).__name__} to run both CFG branches in one "
            "transformer call: list its per-sample transformer inputs in cfg_batched_inputs"
        )


def make_cache_backend(od_config: "OmniDiffusionConfig") -> CacheBackend | None:
    """The backend od_config asks for (its cache_config already parsed), or None."""
    if od_config.cache_backend is None:
        return None
    if od_config.cache_backend == "cache_dit":
        from diffserve.cache.cache_dit_backend import CacheDiTBackend

        return CacheDiTBackend(od_config.cache_config)
    if od_config.cache_backend == "tea_cache":
        from diffserve.cache.teacache import TeaCacheBackend

        return TeaCacheBackend(od_config.cache_config)
    raise ValueError(f"unknown cache_backend {od_config.cache_backend!r}; allowed: cache_dit, tea_cache")
