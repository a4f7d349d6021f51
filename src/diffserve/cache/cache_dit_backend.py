"""Cache-DiT: DBCache from the cache-dit library on diffserve's own transformers.

Every denoiser of the pipeline gets one cache-dit BlockAdapter entry per block list, built from the
transformer's declared `_cache_blocks` (or, for one list, its inferred pattern; see
diffserve.cache.blocks). cache-dit then replaces each list, during the transformer's forward, with a
wrapper that runs the first Fn blocks, decides, and either runs the rest or adds the cached residual.
Each list of each transformer has its own context (its own step count, warmup and cached residual),
so Wan2.2's two experts, which run disjoint steps, never compare one expert's output with the other's.

A model that a declaration cannot describe registers an enabler in CUSTOM_DIT_ENABLERS, keyed by its
pipeline class name: `enabler(pipeline, config) -> refresh(pipeline, num_inference_steps)`; it
installs cache-dit itself (e.g. with per-list ParamsModifiers or a PatchFunctor, and its own handling
of CFG branches) and returns the function that gives its contexts a fresh state before each request.
The diffusers adapter registers one (diffserve.models.diffusers_adapter.cache).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

import torch.nn as nn

from diffserve.cache.base import CacheBackend, check_cfg_runs_in_one_call, denoisers
from diffserve.cache.blocks import cache_block_lists
from diffserve.cache.cache_dit_steps import CacheDiTSteps, RequestRows
from diffserve.cache.config import CacheDiTConfig, resolve_for

if TYPE_CHECKING:
    from cache_dit import CalibratorConfig, DBCacheConfig

logger = logging.getLogger(__name__)

CacheDiTRefresh = Callable[[nn.Module, "int | None"], None]
CacheDiTEnabler = Callable[[nn.Module, CacheDiTConfig], CacheDiTRefresh]


def import_cache_dit():
    try:
        import cache_dit
    except ImportError as exc:
        raise ImportError(
            "cache_backend='cache_dit' needs the cache-dit package (pip install cache-dit); "
            "cache_backend='tea_cache' needs nothing extra"
        ) from exc
    return cache_dit


def db_cache_config(config: CacheDiTConfig) -> "DBCacheConfig":
    """cache-dit's config for a resolved CacheDiTConfig (every tuning field set)."""
    from cache_dit import DBCacheConfig

    if not config.is_resolved():
        raise ValueError(f"resolve {config.strify()} against the model (cache.config.resolve_for) first")
    return DBCacheConfig(
        Fn_compute_blocks=config.Fn_compute_blocks,
        Bn_compute_blocks=config.Bn_compute_blocks,
        max_warmup_steps=config.max_warmup_steps,
        max_cached_steps=config.max_cached_steps,
        max_continuous_cached_steps=config.max_continuous_cached_steps,
        residual_diff_threshold=float(config.residual_diff_threshold),
        # The contexts are rebuilt before every request, so they carry no step count: with one,
        # cache-dit would reset a context by itself once a transformer had made that many calls.
        num_inference_steps=None,
        # One transformer call per step on each rank: CFG branches are batched or CFG-parallel.
        enable_separate_cfg=False,
    )


def calibrator_config(config: CacheDiTConfig) -> "CalibratorConfig | None":
    """cache-dit's forecaster for the skipped blocks' residual (hidden and encoder streams), or None."""
    from cache_dit import DMDCalibratorConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig

    if config.calibrator == "taylorseer":
        return TaylorSeerCalibratorConfig(taylorseer_order=config.taylorseer_order)
    if config.calibrator == "foca":
        return FoCaCalibratorConfig()
    if config.calibrator == "dmd":
        return DMDCalibratorConfig()
    return None


def resolved_configs(transformers: dict[str, nn.Module], config: CacheDiTConfig) -> dict[str, CacheDiTConfig]:
    """Per denoiser: the user's config, its unset fields from that transformer's `_cache_defaults`."""
    return {path: resolve_for(config, transformer) for path, transformer in transformers.items()}


def check_block_counts(transformers: dict[str, nn.Module], configs: dict[str, CacheDiTConfig]) -> None:
    """Fn + Bn blocks always run; at least one block of every list must be skippable."""
    for path, transformer in transformers.items():
        config = configs[path]
        always = config.Fn_compute_blocks + config.Bn_compute_blocks
        for blocks in cache_block_lists(transformer):
            if always >= len(blocks.blocks):
                raise ValueError(
                    f"Fn_compute_blocks ({config.Fn_compute_blocks}) + Bn_compute_blocks "
                    f"({config.Bn_compute_blocks}) must be below the {len(blocks.blocks)} blocks of "
                    f"{path}.{blocks.attr}, or no block could ever be skipped (small models need "
                    f"Fn_compute_blocks=1, Bn_compute_blocks=0)"
                )


def enable_cache_for_dit(pipeline: nn.Module, config: CacheDiTConfig) -> CacheDiTRefresh:
    """The default enabler: every denoiser of the pipeline, with its declared block lists."""
    cache_dit = import_cache_dit()
    from cache_dit import BlockAdapter, ForwardPattern
    from cache_dit.caching import FakeDiffusionPipeline

    check_cfg_runs_in_one_call(pipeline, "cache_dit")
    transformers = denoisers(pipeline)
    configs = resolved_configs(transformers, config)
    check_block_counts(transformers, configs)
    modules = list(transformers.values())
    block_lists = [cache_block_lists(t) for t in modules]
    first = next(iter(configs.values()))
    adapter = BlockAdapter(
        # A stand-in pipeline object: given a real one, cache-dit would patch its class's __call__
        # (every instance in the process). With the stand-in, the contexts live on the transformers
        # and persist until our refresh() rebuilds them before each request.
        pipe=FakeDiffusionPipeline(modules[0]),
        transformer=modules,
        blocks=[[lst.blocks for lst in lists] for lists in block_lists],
        blocks_name=[[lst.attr for lst in lists] for lists in block_lists],
        forward_pattern=[[ForwardPattern[lst.pattern] for lst in lists] for lists in block_lists],
        check_forward_pattern=True,
        params_modifiers=params_modifiers(configs, block_lists, first),
    )
    # With per-list modifiers the base calibrator stays off: a modifier without one would not remove it.
    shared_calibrator = calibrator_config(first) if adapter.params_modifiers is None else None
    cache_dit.enable_cache(adapter, cache_config=db_cache_config(first), calibrator_config=shared_calibrator)

    def refresh(pipeline: nn.Module, num_inference_steps: int | None) -> None:
        for transformer in modules:
            cache_dit.refresh_context(transformer)

    return refresh


def params_modifiers(configs: dict[str, CacheDiTConfig], block_lists: list, first: CacheDiTConfig):
    """None when every denoiser resolved to the same config (the base config serves all); else, in the
    adapter's block-list layout, one ParamsModifier per list carrying its transformer's config."""
    if all(c == first for c in configs.values()):
        return None
    from cache_dit import ParamsModifier

    return [
        [ParamsModifier(cache_config=db_cache_config(c), calibrator_config=calibrator_config(c)) for _ in lists]
        for c, lists in zip(configs.values(), block_lists)
    ]


# Pipeline class name -> enabler, for models whose caching a block declaration cannot describe.
# FLUX (two block lists, both Pattern_1) and Wan2.1/2.2 (one list, Pattern_2, inferred; Wan2.2's two
# experts get separate contexts by default) need none.
CUSTOM_DIT_ENABLERS: dict[str, CacheDiTEnabler] = {}


def context_cached_steps(transformer: nn.Module) -> set[int]:
    """Steps of the current request in which any block list of `transformer` reused its cache.

    cache-dit keeps the context manager and context names on the transformer (as its own
    refresh_context reads them); each context counts the steps of its block list.
    """
    manager = getattr(transformer, "_context_manager", None)
    if manager is None:
        return set()
    return cached_steps_of(manager.get_context(name) for name in getattr(transformer, "_context_names", []))


def cached_steps_of(contexts) -> set[int]:
    """Steps in which any of one transformer's contexts (one per block list) reused its cache."""
    steps: set[int] = set()
    for context in contexts:
        steps.update(context.get_cached_steps())
    return steps


def uninstall(transformer: nn.Module) -> None:
    """cache-dit's disable_cache, then drop the bound copy of the class's forward it leaves on the
    instance, so the transformer is exactly as it was before enable."""
    import_cache_dit().disable_cache(transformer)
    forward = transformer.__dict__.get("forward")
    if getattr(forward, "__func__", None) is type(transformer).forward and forward.__self__ is transformer:
        del transformer.forward


class CacheDiTBackend(CacheBackend):
    name = "cache_dit"

    def __init__(self, config: CacheDiTConfig):
        if not isinstance(config, CacheDiTConfig):
            raise TypeError(f"CacheDiTBackend takes a CacheDiTConfig, got {type(config).__name__}")
        super().__init__(config)
        self._refresh: CacheDiTRefresh | None = None
        self._transformers: list[nn.Module] = []
        # batching="step" (diffserve.cache.cache_dit_steps): installed when the first request joins;
        # each running request's contexts, one dict per transformer, by request id.
        self._steps: list[CacheDiTSteps] = []
        self._requests: dict[str, list[dict[str, Any]]] = {}

    def enable(self, pipeline: nn.Module) -> None:
        if self._enabled:
            raise RuntimeError("cache-dit is already enabled on this pipeline")
        import_cache_dit()
        name = type(pipeline).__name__
        enabler = CUSTOM_DIT_ENABLERS.get(name, enable_cache_for_dit)
        transformers = list(denoisers(pipeline).values())
        try:
            self._refresh = enabler(pipeline, self.config)
        except Exception:
            # cache-dit leaves hooks behind after a failed enable; remove them so the pipeline runs
            # uncached and a later enable starts clean.
            for transformer in transformers:
                uninstall(transformer)
            raise
        self._transformers = transformers
        self._enabled = True
        # The model's name (the diffusers adapter serves many pipeline classes), and what each
        # denoiser resolved to.
        model = getattr(getattr(pipeline, "spec", None), "model", None) or name
        resolved = resolved_configs(denoisers(pipeline), self.config)
        logger.info(
            "Cache-dit enabled successfully on %s (%s)", model,
            ", ".join(f"{path}: {config.strify()}" for path, config in resolved.items()),
        )

    def refresh(self, pipeline: nn.Module, num_inference_steps: int | None) -> None:
        if not self._enabled:
            raise RuntimeError("refresh() before enable()")
        self._refresh(pipeline, num_inference_steps)

    def disable(self, pipeline: nn.Module) -> None:
        if not self._enabled:
            return
        for steps in self._steps:
            steps.remove()
        self._steps, self._requests = [], {}
        for transformer in self._transformers:
            uninstall(transformer)
        self._transformers, self._refresh, self._enabled = [], None, False

    def cached_steps(self) -> int:
        # Wan2.2's experts run disjoint steps, each counted from 0 in its own contexts: add them up.
        return sum(len(context_cached_steps(t)) for t in self._transformers)

    # -- batching="step": cache-dit contexts per running request ----------------------------------

    def begin_request(self, request_id: str, num_inference_steps: int | None, scheduler: Any) -> None:
        # The contexts carry no step count (db_cache_config): nothing here depends on it.
        if not self._steps:
            self._steps = [CacheDiTSteps(t) for t in self._transformers]
        self._requests[request_id] = [steps.new_contexts() for steps in self._steps]

    def select_requests(self, layout: list[tuple[str, torch.Tensor]] | None) -> None:
        for i, steps in enumerate(self._steps):
            steps.requests = None if layout is None else [
                RequestRows(self._requests[rid][i], rows) for rid, rows in layout
            ]

    def finish_request(self, request_id: str) -> dict[str, Any]:
        contexts = self._requests.pop(request_id)
        count = sum(len(cached_steps_of(per_list.values())) for per_list in contexts)
        for per_list in contexts:
            for context in per_list.values():
                context.clear_buffers()
        return self.metrics(count)
