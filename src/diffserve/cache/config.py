"""Typed step-cache configuration, one dataclass per backend.

`OmniDiffusionConfig(cache_backend=..., cache_config={...})` parses the dict into the backend's
dataclass: an unknown key is an error that names it and lists the allowed ones, and every value is
type- and range-checked here, before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Union

from diffserve.config import check_known_keys


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")


@dataclass
class CacheDiTConfig:
    """DBCache from the cache-dit library (`cache_backend="cache_dit"`).

    Per block list, the first `Fn_compute_blocks` blocks run every step; when the relative L1 change
    of their output residual since the last computed step is below `residual_diff_threshold`, the
    middle blocks are skipped and their cached residual is added instead; the last
    `Bn_compute_blocks` blocks always run. The defaults are "F1B0": the fastest setting that still
    decides from a computed block.
    """

    # Blocks at the start of each block list that always run; their residual decides the skip.
    # Fn + Bn must be below the list's block count.
    Fn_compute_blocks: int = 1
    # Blocks at the end of each block list that always run, refining the cached approximation.
    Bn_compute_blocks: int = 0
    # Steps at the start of each request (per transformer) that always run.
    max_warmup_steps: int = 4
    # Most steps per request that may reuse the cache; -1: no limit.
    max_cached_steps: int = -1
    # Most consecutive steps that may reuse the cache; -1: no limit.
    max_continuous_cached_steps: int = 3
    # Skip while the relative L1 change is below this: higher is faster and lossier; 0 never skips.
    residual_diff_threshold: float = 0.24

    def __post_init__(self) -> None:
        _check_int("Fn_compute_blocks", self.Fn_compute_blocks, 1)
        _check_int("Bn_compute_blocks", self.Bn_compute_blocks, 0)
        _check_int("max_warmup_steps", self.max_warmup_steps, 0)
        _check_int("max_cached_steps", self.max_cached_steps, -1)
        _check_int("max_continuous_cached_steps", self.max_continuous_cached_steps, -1)
        _check_float("residual_diff_threshold", self.residual_diff_threshold)

    def strify(self) -> str:
        """Short tag for logs and benchmark tables, e.g. DBCache_F1B0_W4_M-1_MC3_R0.24."""
        return (
            f"DBCache_F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}_W{self.max_warmup_steps}"
            f"_M{self.max_cached_steps}_MC{self.max_continuous_cached_steps}_R{self.residual_diff_threshold}"
        )


@dataclass
class TeaCacheConfig:
    """TeaCache (`cache_backend="tea_cache"`), diffserve's own implementation.

    Each step, the relative L1 change of the first block's timestep-modulated input is rescaled by a
    per-model polynomial and accumulated; while the sum stays below `rel_l1_thresh`, every transformer
    block is skipped and the residual they added on the last computed step is reused. The first and
    last steps of a request always run.
    """

    # Skip while the accumulated rescaled change is below this: higher is faster and lossier; 0 never
    # skips. TeaCache4FLUX reports 0.25 -> 1.5x, 0.4 -> 1.8x, 0.6 -> 2.0x, 0.8 -> 2.25x on FLUX.1-dev.
    rel_l1_thresh: float = 0.2
    # Rescale polynomial, highest power first. None: the coefficients the transformer declares
    # (`_teacache_coefficients`), fitted for that model.
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_float("rel_l1_thresh", self.rel_l1_thresh)
        if self.coefficients is not None:
            if isinstance(self.coefficients, (str, bytes)) or not hasattr(self.coefficients, "__iter__"):
                raise ValueError(f"coefficients must be a list of numbers, got {self.coefficients!r}")
            coefficients = tuple(self.coefficients)
            if not coefficients:
                raise ValueError("coefficients must have at least one number")
            for i, c in enumerate(coefficients):
                if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
                    raise ValueError(f"coefficients[{i}] must be a finite number, got {c!r}")
            self.coefficients = tuple(float(c) for c in coefficients)

    def strify(self) -> str:
        return f"TeaCache_T{self.rel_l1_thresh}" + ("_custom" if self.coefficients is not None else "")


CacheConfig = Union[CacheDiTConfig, TeaCacheConfig]

CACHE_CONFIG_CLASSES: dict[str, type] = {"cache_dit": CacheDiTConfig, "tea_cache": TeaCacheConfig}


def parse_cache_config(backend: str | None, values: dict[str, Any] | CacheConfig | None) -> CacheConfig | None:
    """The typed config for `backend` from a dict (or an already typed config); None without a backend."""
    if backend is None:
        if values:
            raise ValueError(f"cache_config {values!r} was given without a cache_backend (cache_dit or tea_cache)")
        return None
    if backend not in CACHE_CONFIG_CLASSES:
        raise ValueError(f"cache_backend must be one of {', '.join(CACHE_CONFIG_CLASSES)}, got {backend!r}")
    cls = CACHE_CONFIG_CLASSES[backend]
    if values is None:
        return cls()
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        if not isinstance(values, cls):
            raise ValueError(f"cache_backend={backend!r} takes a {cls.__name__}, got a {type(values).__name__}")
        return values
    if not isinstance(values, dict):
        raise ValueError(f"cache_config must be a dict, got {type(values).__name__}")
    check_known_keys(f"{backend} cache_config", values, [f.name for f in dataclasses.fields(cls)])
    return cls(**values)
