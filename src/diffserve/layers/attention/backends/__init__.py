"""Attention backends, by name. Torch SDPA is always there; the others register when importable."""

from __future__ import annotations

import importlib
import logging

import torch

from diffserve.layers.attention.backends.abstract import AttentionBackend
from diffserve.layers.attention.backends.sdpa import TorchSDPABackend

logger = logging.getLogger(__name__)

# name -> (module, class); imported only when asked for.
_BACKENDS: dict[str, tuple[str, str]] = {
    "sdpa": ("diffserve.layers.attention.backends.sdpa", "TorchSDPABackend"),
    "flash_attn": ("diffserve.layers.attention.backends.flash_attn", "FlashAttnBackend"),
    "sage_attn": ("diffserve.layers.attention.backends.sage_attn", "SageAttnBackend"),
    "cudnn_fp8": ("diffserve.layers.attention.backends.cudnn_fp8", "CudnnFp8AttentionBackend"),
}
DEFAULT_BACKEND = "sdpa"


def backend_names() -> list[str]:
    return list(_BACKENDS)


def get_backend_class(name: str) -> type[AttentionBackend]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def select_attention_backend(
    name: str | None, device: torch.device, dtype: torch.dtype
) -> type[AttentionBackend]:
    """The backend asked for if it can run here, else SDPA with the reason logged.

    An unknown name is an error: a typo must not silently turn into a slower run.
    """
    name = name or DEFAULT_BACKEND
    backend = get_backend_class(name)
    reason = backend.unavailable_reason(device, dtype)
    if reason is None:
        logger.info("attention backend: %s", name)
        return backend
    logger.warning("attention backend %r cannot run here (%s); falling back to 'sdpa'", name, reason)
    return TorchSDPABackend
