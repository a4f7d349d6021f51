"""Fit TeaCache rescale coefficients for a model, the way the TeaCache authors fitted theirs.

Run uncached requests; at every step record the relative L1 change (from the previous step) of the
first block's modulated input (what TeaCache watches) and of the transformer's output (what a skip
actually gets wrong). A polynomial from the first to the second is the rescale TeaCache accumulates:
a step is skipped while the predicted output change stays under `rel_l1_thresh`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from diffserve.cache.blocks import cache_block_lists
from diffserve.cache.teacache.hook import relative_l1_distance


class ChangeRecorder:
    """Hooks on one transformer that collect (input change, output change) pairs, step by step."""

    def __init__(self, transformer: nn.Module):
        modulated_input = getattr(transformer, "_teacache_modulated_input", None)
        if modulated_input is None:
            raise ValueError(f"{type(transformer).__name__} declares no _teacache_modulated_input to fit against")
        first_block = cache_block_lists(transformer)[0].blocks[0]
        self.pairs: list[tuple[float, float]] = []
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self._current_input: torch.Tensor | None = None

        def on_first_block(module, args, kwargs):
            self._current_input = modulated_input(module, *args, **kwargs).detach().float()

        def on_transformer(module, args, kwargs, output):
            out = output.detach().float()
            if self._previous is not None and self._previous[0].shape == self._current_input.shape:
                x = relative_l1_distance(self._previous[0], self._current_input)
                y = relative_l1_distance(self._previous[1], out)
                self.pairs.extend(zip(x.tolist(), y.tolist()))
            self._previous = (self._current_input, out)

        self._handles = [
            first_block.register_forward_pre_hook(on_first_block, with_kwargs=True),
            transformer.register_forward_hook(on_transformer, with_kwargs=True),
        ]

    def new_request(self) -> None:
        """Steps of different requests are not consecutive."""
        self._previous = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def fit_coefficients(pairs: Sequence[tuple[float, float]], degree: int = 4) -> tuple[float, ...]:
    """Least-squares polynomial (highest power first) from input change to output change."""
    if len(pairs) <= degree:
        raise ValueError(f"need more than {degree} (input, output) change pairs to fit, got {len(pairs)}")
    x, y = np.asarray(pairs, dtype=np.float64).T
    return tuple(float(c) for c in np.polyfit(x, y, degree))
