"""Cache-DiT on diffusers pipelines served by the adapter.

cache-dit knows the block lists and forward patterns of many diffusers pipelines (its registered
BlockAdapters, found by pipeline class name). The adapter reads them in two places:
- at load, it declares them on each denoiser as `_cache_blocks` (diffserve.cache.blocks), so the
  engine sees the same block lists a native transformer declares (where they are the transformer's
  own lists: for FLUX cache-dit builds one list of both kinds of blocks, which no attribute holds);
- with cache_backend="cache_dit", the enabler below (registered in CUSTOM_DIT_ENABLERS) installs
  cache-dit from that adapter, with a stand-in pipeline object as for native models (given the real
  pipeline, cache-dit would patch its class's __call__ for every instance in the process), and
  cache-dit's own knowledge of whether the pipeline runs its CFG branches as separate calls.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch.nn as nn

if TYPE_CHECKING:
    from diffserve.cache.cache_dit_backend import CacheDiTRefresh
    from diffserve.cache.config import CacheDiTConfig

logger = logging.getLogger(__name__)


def registered_block_adapter(pipe):
    """cache-dit's BlockAdapter for this diffusers pipeline, not applied yet; None when cache-dit is not
    installed or does not know the pipeline."""
    try:
        from cache_dit.caching.block_adapters import BlockAdapterRegister
    except ImportError:
        return None
    try:
        return BlockAdapterRegister.get_adapter(pipe, skip_post_init=True)
    except (AssertionError, AttributeError, ImportError, TypeError) as exc:  # a family match of another shape
        logger.info("cache-dit's adapter for %s does not fit it (%s)", type(pipe).__name__, exc)
        return None


def _as_list(value, leaf: type) -> list:
    return [value] if isinstance(value, leaf) else list(value)


def block_lists(adapter) -> list[tuple[nn.Module, list[tuple[nn.ModuleList, str]]]]:
    """[(transformer, [(block list, forward pattern name), ...]), ...] from a raw BlockAdapter (one or
    several transformers, each with one or several block lists)."""
    from cache_dit import ForwardPattern

    transformers = _as_list(adapter.transformer, nn.Module)
    blocks = [adapter.blocks] if len(transformers) == 1 else list(adapter.blocks)
    patterns = [adapter.forward_pattern] if len(transformers) == 1 else list(adapter.forward_pattern)
    result = []
    for transformer, lists, pattern in zip(transformers, blocks, patterns):
        lists = _as_list(lists, nn.ModuleList)
        pattern = _as_list(pattern, ForwardPattern)
        pattern = pattern * len(lists) if len(pattern) == 1 else pattern
        result.append((transformer, [(blk, p.name) for blk, p in zip(lists, pattern)]))
    return result


def _attr_of(transformer: nn.Module, blocks: nn.ModuleList) -> str | None:
    return next((name for name, child in transformer.named_children() if child is blocks), None)


def declare_cache_blocks(pipe, denoisers: list[str]) -> None:
    """Declare `_cache_blocks` on the pipeline's denoisers from cache-dit's adapter, where cache-dit
    knows the pipeline and the model declares none itself."""
    adapter = registered_block_adapter(pipe)
    if adapter is None:
        return
    mine = {id(getattr(pipe, name)) for name in denoisers}
    for transformer, lists in block_lists(adapter):
        declared = {_attr_of(transformer, blk): pattern for blk, pattern in lists}
        if id(transformer) not in mine or None in declared or hasattr(transformer, "_cache_blocks"):
            continue
        transformer._cache_blocks = declared


def check_skippable(lists, config: "CacheDiTConfig") -> None:
    """Fn + Bn blocks always run; at least one block of every list must be skippable. (cache-dit's lists
    may be built for caching, e.g. FLUX's two block lists as one, so they are counted as it has them.)"""
    always = config.Fn_compute_blocks + config.Bn_compute_blocks
    for transformer, blocks in lists:
        for blk, _ in blocks:
            if always >= len(blk):
                raise ValueError(
                    f"Fn_compute_blocks ({config.Fn_compute_blocks}) + Bn_compute_blocks ({config.Bn_compute_blocks}) "
                    f"must be below the {len(blk)} blocks of a block list of {type(transformer).__name__}, or no "
                    "block could ever be skipped (small models need Fn_compute_blocks=1, Bn_compute_blocks=0)"
                )


def check_calibrator_applies(lists, config: "CacheDiTConfig") -> None:
    """cache-dit's calibrators forecast the encoder stream's residual too, which it never stores for a
    block list holding a block that returns no encoder stream (diffusers' `context_pre_only` blocks,
    e.g. SD3's last one): cache-dit 1.5.3 then fails on the first cached step. Refused at start."""
    if config.calibrator == "none":
        return
    for transformer, blocks in lists:
        for blk, _ in blocks:
            if any(getattr(block, "context_pre_only", False) for block in blk):
                raise ValueError(
                    f"calibrator={config.calibrator!r} cannot be used with the diffusers adapter's "
                    f"{type(transformer).__name__}: a block of it returns no encoder stream, whose residual "
                    "cache-dit's calibrators also forecast. Allowed here: calibrator='none' (diffserve's "
                    "native pipeline of the model, where there is one, takes any calibrator)"
                )


def enable_cache_dit(pipeline: nn.Module, config: "CacheDiTConfig") -> "CacheDiTRefresh":
    """CUSTOM_DIT_ENABLERS entry of DiffusersAdapterPipeline."""
    from cache_dit.caching import FakeDiffusionPipeline
    from cache_dit.caching.block_adapters import BlockAdapterRegister

    from diffserve.cache.cache_dit_backend import calibrator_config, db_cache_config, import_cache_dit
    from diffserve.cache.config import resolve_for

    cache_dit = import_cache_dit()
    pipe = pipeline.diffusers_pipeline
    registered = registered_block_adapter(pipe)
    if registered is None:
        _, known = BlockAdapterRegister.supported_pipelines()
        raise ValueError(
            f"cache_backend='cache_dit': cache-dit does not support {type(pipe).__name__}, so the diffusers adapter "
            f"cannot cache it (cache-dit knows the families {', '.join(sorted(known))}); run without a step cache"
        )
    lists = block_lists(registered)
    transformers = [t for t, _ in lists]
    # diffusers' transformers declare no step-cache defaults: the keys the user left unset take the
    # built-in ones (cache.config.CacheDiTConfig.BUILTIN_DEFAULTS).
    config = resolve_for(config, transformers[0])
    check_skippable(lists, config)
    check_calibrator_applies(lists, config)
    adapter = dataclasses.replace(registered, pipe=FakeDiffusionPipeline(transformers[0]), skip_post_init=False)
    # diffserve's native pipelines batch their CFG branches; a diffusers pipeline may call its
    # transformer once per branch, which cache-dit then caches per branch.
    cache_config = dataclasses.replace(db_cache_config(config),
                                       enable_separate_cfg=BlockAdapterRegister.has_separate_cfg(pipe))
    cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator_config(config))

    def refresh(pipeline: nn.Module, num_inference_steps: int | None) -> None:
        for transformer in transformers:
            cache_dit.refresh_context(transformer)

    return refresh
