"""The built-in demo model (DiffservePixelDiTPipeline): a small text-to-image DiT trained by us on
scenes of coloured shapes, shipped in `diffserve/assets/demo_model` and used when no model is given.

Names are exported lazily: the training code (diffserve.demo) reads the configs and captions on a
machine without diffusers, and must not pull in the pipeline.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DiffservePixelDiTPipeline": "pipeline_demo_dit",
    "DemoDiTTransformer2DModel": "demo_dit_transformer",
    "DemoTextEncoder": "text_encoder",
    "DemoDiTConfig": "configs",
    "DemoTextEncoderConfig": "configs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
