"""TeaCache: skip every transformer block on steps whose timestep-modulated input barely changed."""

from diffserve.cache.teacache.backend import TeaCacheBackend
from diffserve.cache.teacache.hook import TeaCacheHook, relative_l1_distance, rescale

__all__ = ["TeaCacheBackend", "TeaCacheHook", "relative_l1_distance", "rescale"]
