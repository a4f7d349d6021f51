"""Regional torch.compile: each repeated transformer block is compiled once and reused.

Compiling the blocks a model lists in `_repeated_blocks` (rather than the whole model) keeps compile
time to one block's worth and survives changes around the blocks (hooks, caching, offload).
"""

from __future__ import annotations

import logging

import torch.nn as nn

logger = logging.getLogger(__name__)


def compile_repeated_blocks(model: nn.Module, **compile_kwargs) -> int:
    names = set(getattr(model, "_repeated_blocks", []))
    if not names:
        logger.info("%s declares no _repeated_blocks; not compiling it", type(model).__name__)
        return 0
    count = 0
    for module in model.modules():
        # Match on the class hierarchy: wrappers such as FSDP2 subclass the block's class.
        if any(cls.__name__ in names for cls in type(module).__mro__):
            module.compile(**compile_kwargs)
            count += 1
    logger.info("torch.compile applied to %d blocks of %s", count, type(model).__name__)
    return count
