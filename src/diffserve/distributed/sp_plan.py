"""Declarative sequence-parallel plans.

A transformer declares `_sp_plan = {module_path: {kwarg: SequenceParallelInput(...)}, module_path:
SequenceParallelOutput(...)}`: which inputs of which submodule are split along the sequence, and
where the output is gathered back. The engine turns the plan into forward hooks; the model's
`forward` never changes. "" names the transformer itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SequenceParallelInput:
    split_dim: int
    expected_dims: int | None = None
    # True: split the module's output instead of the named input (e.g. a RoPE module).
    split_output: bool = False
    # True: the length need not divide by the degree; it is padded with zeros to the next multiple
    # first. Only for a sequence whose padding is masked out as attention keys (its key mask declared
    # with `mask_of`) and which is never gathered back (e.g. the text stream of an MMDiT).
    pad: bool = False
    # This input is the [B, S] key mask (True or 1: attend) of the sequence that input `mask_of` of the
    # same module holds: it is split like that sequence and, where the sequence is padded, padded with
    # False (a mask given as None, meaning "attend everywhere", becomes all True first).
    mask_of: str | None = None

    def __post_init__(self):
        if self.mask_of is not None and (self.split_output or self.expected_dims not in (None, 2)):
            raise ValueError("a key mask (mask_of) is a [B, S] module input: no split_output, expected_dims 2")


@dataclass(frozen=True)
class SequenceParallelOutput:
    gather_dim: int
    expected_dims: int | None = None


SequenceParallelPlan = dict[str, "dict[str | int, SequenceParallelInput] | SequenceParallelOutput"]
