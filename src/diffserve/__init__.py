"""diffserve: a fast, extensible inference and serving engine for diffusion models.

Importing the package loads no model family and does not initialise CUDA; names are resolved lazily.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Omni": "diffserve.entrypoints.omni",
    "OmniDiffusionConfig": "diffserve.config",
    "DiffusionParallelConfig": "diffserve.config",
    "OmniDiffusionSamplingParams": "diffserve.request",
    "OmniDiffusionRequest": "diffserve.request",
    "DiffusionOutput": "diffserve.request",
    "PromptInput": "diffserve.request",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from diffserve.config import DiffusionParallelConfig, OmniDiffusionConfig
    from diffserve.entrypoints.omni import Omni
    from diffserve.request import DiffusionOutput, OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffserve' has no attribute {name!r}")
