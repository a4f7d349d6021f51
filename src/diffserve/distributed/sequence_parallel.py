"""Sequence parallelism (Ulysses, ring, or both), applied from outside the model.

A transformer's `_sp_plan` says where the token sequence is split across the sequence-parallel ranks
(ulysses x ring of them) and where it is gathered back; this module turns it into forward hooks and
switches every `Attention` layer of the denoisers to sequence-parallel attention:

- Ulysses: before attention an all-to-all trades sequence shards for head shards (each rank then
  attends over the Ulysses group's whole sequence with 1/U of the heads); a second one trades back.
- Ring (ring_attention.py): each rank attends its queries to every rank's keys/values, passed around
  the ring while the kernels run.
- Both (USP): the Ulysses exchange runs inside each ring position, then the ring runs over the
  Ulysses groups' sequences. Sequence-parallel rank u + U * r holds shard u + U * r, so a Ulysses
  group gathers one contiguous ring part.

Model code does not change. A mismatch between the plan and the tensors (a missing input, a wrong
rank, a length that does not divide by the degree) is an error naming the module and the input; it
never falls back silently.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from diffserve.distributed.parallel_state import GroupCoordinator, get_ring_group, get_sp_group, get_ulysses_group
from diffserve.distributed.ring_attention import ring_attention
from diffserve.distributed.sp_plan import SequenceParallelInput, SequenceParallelOutput
from diffserve.layers.attention import Attention
from diffserve.models.interface import discover_components

logger = logging.getLogger(__name__)


# -- Ulysses all-to-all ------------------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """Exchange the chunks of dim 0 (one per rank): chunk j goes to rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps strides, and the exchange needs row-major
    dist.all_to_all_single(out, x, group=group.group)
    return out


def sequence_to_heads(x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """[B, S/P, H, D] (this rank's tokens, all heads) -> [B, S, H/P, D] (all tokens, this rank's heads)."""
    p = group.world_size
    b, s, h, d = x.shape
    x = x.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4)  # [P (head group), B, s, H/P, D]
    x = _all_to_all(x, group)  # [P (sequence chunk), B, s, H/P, D]
    return x.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)


def heads_to_sequence(x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """Inverse of sequence_to_heads: [B, S, H/P, D] -> [B, S/P, H, D]."""
    p = group.world_size
    b, s_full, h_local, d = x.shape
    s = s_full // p
    x = x.reshape(b, p, s, h_local, d).permute(1, 0, 2, 3, 4)  # [P (sequence chunk), B, s, H/P, D]
    x = _all_to_all(x, group)  # [P (head group), B, s, H/P, D]
    return x.permute(1, 2, 0, 3, 4).reshape(b, s, p * h_local, d)


class SequenceParallelAttention:
    """Wraps an Attention layer's computation with the Ulysses exchange and/or the ring (holds no weights)."""

    def __init__(self, ulysses: GroupCoordinator, ring: GroupCoordinator):
        self.ulysses = ulysses
        self.ring = ring

    def __call__(self, attention: Attention, query, key, value, attn_mask):
        if attn_mask is not None:
            raise ValueError(
                f"{attention.prefix or 'attention'}: an attention mask is not supported with sequence "
                f"parallelism (the mask would have to be split along the sequence)"
            )
        if self.ulysses.world_size > 1:
            query, key, value = (sequence_to_heads(t, self.ulysses) for t in (query, key, value))
        if self.ring.world_size > 1:
            out = ring_attention(query, key, value, attention.softmax_scale, self.ring, attention.backend)
        else:
            out = attention.compute(query, key, value, None)
        if self.ulysses.world_size > 1:
            out = heads_to_sequence(out, self.ulysses)
        return out


# -- the plan's hooks --------------------------------------------------------------------------------


def _split(x: Any, spec: SequenceParallelInput, group: GroupCoordinator, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"sequence parallel plan: {where} is {type(x).__name__}, expected a tensor")
    if spec.expected_dims is not None and x.dim() != spec.expected_dims:
        raise ValueError(
            f"sequence parallel plan: {where} has {x.dim()} dims (shape {tuple(x.shape)}), the plan expects "
            f"{spec.expected_dims}"
        )
    length = x.shape[spec.split_dim]
    if length % group.world_size:
        raise ValueError(
            f"sequence parallel: {where} has length {length} along dim {spec.split_dim}, which does not divide "
            f"by the sequence parallel degree {group.world_size}; choose a size (or text length) that does"
        )
    return x.chunk(group.world_size, dim=spec.split_dim)[group.rank_in_group].contiguous()


def _positions(module: nn.Module) -> dict[str, int]:
    """Name -> positional index of a module's forward parameters."""
    params = list(inspect.signature(module.forward).parameters)
    return {name: i for i, name in enumerate(params)}


def _install_input_split(module: nn.Module, name: str, specs: dict, group: GroupCoordinator) -> list:
    positions = _positions(module)
    input_specs = {k: s for k, s in specs.items() if not s.split_output}
    output_specs = {k: s for k, s in specs.items() if s.split_output}
    handles = []

    if input_specs:
        def split_inputs(mod, args, kwargs):
            args = list(args)
            for key, spec in input_specs.items():
                where = f"{name or type(mod).__name__} input {key!r}"
                if key in kwargs:
                    if kwargs[key] is not None:
                        kwargs[key] = _split(kwargs[key], spec, group, where)
                    continue
                index = key if isinstance(key, int) else positions.get(key)
                if index is None or index >= len(args):
                    raise ValueError(f"sequence parallel plan: {where} was not passed to {type(mod).__name__}")
                if args[index] is not None:
                    args[index] = _split(args[index], spec, group, where)
            return tuple(args), kwargs

        handles.append(module.register_forward_pre_hook(split_inputs, with_kwargs=True))

    if output_specs:
        def split_outputs(mod, args, output):
            items = list(output) if isinstance(output, (tuple, list)) else [output]
            for key, spec in output_specs.items():
                if not isinstance(key, int) or key >= len(items):
                    raise ValueError(f"sequence parallel plan: {name} output {key!r} does not exist")
                items[key] = _split(items[key], spec, group, f"{name} output {key}")
            return type(output)(items) if isinstance(output, (tuple, list)) else items[0]

        handles.append(module.register_forward_hook(split_outputs))
    return handles


def _install_output_gather(module: nn.Module, name: str, spec: SequenceParallelOutput, group: GroupCoordinator):
    def gather(mod, args, output):
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"sequence parallel plan: {name} output is {type(output).__name__}, expected a tensor")
        if spec.expected_dims is not None and output.dim() != spec.expected_dims:
            raise ValueError(f"sequence parallel plan: {name} output has {output.dim()} dims, expected {spec.expected_dims}")
        return group.all_gather(output, dim=spec.gather_dim)

    return [module.register_forward_hook(gather)]


def apply_sequence_parallel(pipeline: nn.Module, parallel_config) -> None:
    """Shard every denoiser's sequence over the sequence-parallel group, as its `_sp_plan` declares."""
    group, ulysses, ring = get_sp_group(), get_ulysses_group(), get_ring_group()
    if group.world_size == 1:
        return
    for path, transformer in discover_components(pipeline)["dit"].items():
        plan = getattr(type(transformer), "_sp_plan", None)
        if not plan:
            raise ValueError(f"{type(transformer).__name__} declares no _sp_plan, so it cannot run sequence parallel")
        for name, spec in plan.items():
            module = transformer.get_submodule(name) if name else transformer
            if isinstance(spec, SequenceParallelOutput):
                _install_output_gather(module, name, spec, group)
            else:
                _install_input_split(module, name, spec, group)
        wrapper = SequenceParallelAttention(ulysses, ring)
        count = 0
        for module in transformer.modules():
            if isinstance(module, Attention) and not module.skip_sequence_parallel:
                if module.num_heads % ulysses.world_size:
                    raise ValueError(
                        f"{path}: attention with {module.num_heads} heads (per tensor-parallel rank) cannot be "
                        f"split over ulysses_degree={ulysses.world_size}; use ring_degree for the rest"
                    )
                module.sequence_parallel = wrapper
                count += 1
        logger.info(
            "sequence parallel (ulysses %d x ring %d) on %s: %d attention layers",
            ulysses.world_size, ring.world_size, path, count,
        )
