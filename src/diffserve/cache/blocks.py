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
from typing import Any, Iterable

import torch
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


def run_blocks(blocks: Iterable[nn.Module], io: BlockIO, h: torch.Tensor, args: tuple, kwargs: dict):
    """Call `blocks` in turn as the block list would (args[0] is the encoder stream when the blocks
    take one); the final (hidden, encoder) streams, encoder None without one."""
    e = args[0] if io.takes_encoder else None
    rest = args[1:] if io.takes_encoder else args
    for block in blocks:
        out = block(h, e, *rest, **kwargs) if io.takes_encoder else block(h, *rest, **kwargs)
        if io.returns == (H,):
            h = out
        elif io.returns == (H, E):
            h, e = out
        else:
            e, h = out
    return h, e


def pack_outputs(io: BlockIO, h: torch.Tensor, e: torch.Tensor | None):
    """(hidden, encoder) as the block list returns them."""
    if io.returns == (H,):
        return h
    if io.returns == (H, E):
        return h, e
    return e, h


def take_rows(value: Any, rows: torch.Tensor | None, batch: int) -> Any:
    """`rows` of a per-sample block argument (a tensor whose first dimension is the batch); shared
    arguments (rotary tables, or tuples of them) pass unchanged. Step caches under step-level
    batching run blocks on the rows of some requests only."""
    if rows is None or not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        return value
    return value.index_select(0, rows)


def args_rows(args: tuple, kwargs: dict, rows: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    """`rows` of the per-sample ones among a block list's arguments (see take_rows)."""
    return tuple(take_rows(a, rows, batch) for a in args), {k: take_rows(v, rows, batch) for k, v in kwargs.items()}


def rows_of(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """`rows` of a per-sample tensor (None rows: all of them; None stays None)."""
    return x if x is None or rows is None else x.index_select(0, rows)
