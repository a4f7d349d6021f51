"""Step caching: reuse transformer work across denoise steps (Cache-DiT's DBCache, TeaCache).

`OmniDiffusionConfig(cache_backend="cache_dit" | "tea_cache", cache_config={...})` picks a backend;
the worker enables it once and refreshes it before every request. Backends import their heavy
dependencies (cache-dit) only when chosen.
"""

from diffserve.cache.base import CacheBackend, make_cache_backend
from diffserve.cache.config import CACHE_CONFIG_CLASSES, CacheDiTConfig, TeaCacheConfig, parse_cache_config

__all__ = [
    "CACHE_CONFIG_CLASSES",
    "CacheBackend",
    "CacheDiTConfig",
    "TeaCacheConfig",
    "make_cache_backend",
    "parse_cache_config",
]
