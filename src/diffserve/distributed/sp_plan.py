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


@dataclass(frozen=True)
class SequenceParallelOutput:
    gather_dim: int
    expected_dims: int | None = None


SequenceParallelPlan = dict[str, "dict[str | int, SequenceParallelInput] | SequenceParallelOutput"]
