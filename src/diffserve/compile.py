"""Regional torch.compile: each repeated transformer block is compiled once and reused.

Compiling the blocks a model lists in `_repeated_blocks` (rather than the whole model) keeps compile
time to one block's worth and survives changes around the blocks (hooks, caching, offload).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from diffserve.models.interface import is_repeated_block

logger = logging.getLogger(__name__)


def compile_repeated_blocks(model: nn.Module, **compile_kwargs) -> int:
    names = set(getattr(model, "_repeated_blocks", []))
    if not names:
        logger.info("%s declares no _repeated_blocks; not compiling it", type(model).__name__)
        return 0
    count = 0
    for module in model.modules():
        if is_repeated_block(module, names):
            module.compile(**compile_kwargs)
            count += 1
    logger.info("torch.compile applied to %d blocks of %s", count, type(model).__name__)
    return count
