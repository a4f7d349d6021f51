"""Which block lists of a transformer a step cache wraps, and how their blocks are called.

Both backends skip whole runs of transformer blocks, so they need each block list and its blocks'
I/O. A transformer states them in `_cache_blocks`, {list attribute: pattern}, in call order; the
patterns are cache-dit's `ForwardPattern` names, so one declaration serves both backends:

    Pattern_0  block(hidden_states, encoder_hidden_states, *args) -> (hidden_states, encoder_hidden_states)
    Pattern_1  block(hidden_states, encoder_hidden_states, *args) -> (encoder_hidden_states, hidden_states)
    Pattern_2  block(hidden_states, encoder_hidden_states, *args) -> hidden_states
    Pattern_3  block(hidden_states, *args) -> hidden_states
    Pattern_4  block(hidden_states, *args) -> (hidden_states, encoder_hidden_states)
    Pattern_5  block(hidden_states, *args) -> (encoder_hidden_states, hidden_states)

A transformer needs no declaration when its block signatures tell their patterns (first parameters
named as above, return annotated as one tensor): the lists are then its block lists
(diffserve.models.interface.block_list_attrs, derived from `_repeated_blocks`). Blocks returning a
tuple must be declared, since an order cannot be read from a signature.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.nn as nn

from diffserve.models.interface import block_list_attrs

H, E = "hidden_states", "encoder_hidden_states"


@dataclass(frozen=True)
class BlockIO:
    """A block's call and return convention."""

    takes_encoder: bool
    returns: tuple[str, ...]

    @property
    def returns_encoder(self) -> bool:
        return E in self.returns


FORWARD_PATTERNS: dict[str, BlockIO] = {
    "Pattern_0": BlockIO(True, (H, E)),
    "Pattern_1": BlockIO(True, (E, H)),
    "Pattern_2": BlockIO(True, (H,)),
    "Pattern_3": BlockIO(False, (H,)),
    "Pattern_4": BlockIO(False, (H, E)),
    "Pattern_5": BlockIO(False, (E, H)),
}


@dataclass(frozen=True)
class CachedBlockList:
    """One block list of a transformer: its attribute name, the ModuleList and its pattern name."""

    attr: str
    blocks: nn.ModuleList
    pattern: str

    @property
    def io(self) -> BlockIO:
        return FORWARD_PATTERNS[self.pattern]


def infer_forward_pattern(block: nn.Module) -> str | None:
    """The pattern a block's signature states unambiguously (one returned tensor), else None."""
    try:
        signature = inspect.signature(block.forward)
    except (TypeError, ValueError):
        return None
    positional = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if not positional or positional[0] != H:
        return None
    returns = signature.return_annotation
    if returns is inspect.Signature.empty:
        return None
    text = returns if isinstance(returns, str) else getattr(returns, "__name__", str(returns))
    if text.replace("torch.", "") != "Tensor":
        return None  # a tuple's order cannot be read from a signature: the model must declare it
    return "Pattern_2" if len(positional) > 1 and positional[1] == E else "Pattern_3"


def _module_list(transformer: nn.Module, attr: str) -> nn.ModuleList:
    blocks = getattr(transformer, attr, None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"{type(transformer).__name__}.{attr} is not a non-empty nn.ModuleList of blocks "
            f"(got {type(blocks).__name__})"
        )
    return blocks


def cache_block_lists(transformer: nn.Module) -> list[CachedBlockList]:
    """The block lists a step cache wraps, in call order, from the transformer's declaration."""
    name = type(transformer).__name__
    declared = getattr(transformer, "_cache_blocks", None)
    if declared is not None:
        lists = []
        for attr, pattern in declared.items():
            if pattern not in FORWARD_PATTERNS:
                raise ValueError(
                    f"{name}._cache_blocks[{attr!r}] = {pattern!r} is not a forward pattern. "
                    f"Allowed: {', '.join(FORWARD_PATTERNS)}"
                )
            lists.append(CachedBlockList(attr, _module_list(transformer, attr), pattern))
        if not lists:
            raise ValueError(f"{name}._cache_blocks is empty")
        return lists
    attrs = block_list_attrs(transformer)
    if not attrs:
        raise ValueError(
            f"{name} has no block lists a step cache could skip: declare _repeated_blocks (the block class "
            "names) or _cache_blocks = {list attribute: forward pattern}"
        )
    lists = []
    for attr in attrs:
        blocks = _module_list(transformer, attr)
        pattern = infer_forward_pattern(blocks[0])
        if pattern is None:
            raise ValueError(
                f"the forward pattern of {type(blocks[0]).__name__} (in {name}.{attr}) cannot be read from its "
                f"signature; declare _cache_blocks = {{{attr!r}: 'Pattern_N', ...}} on {name} "
                f"(see diffserve.cache.blocks)"
            )
        lists.append(CachedBlockList(attr, blocks, pattern))
    return lists
