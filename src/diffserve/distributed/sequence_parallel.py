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


def gather_key_mask(mask: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """[B, S/P] key mask of this rank's keys -> [B, S], the mask of the keys sequence_to_heads gathers."""
    # As bytes: collectives do not all take bool tensors.
    return group.all_gather(mask.to(torch.uint8), dim=1).bool()


class SequenceParallelAttention:
    """Wraps an Attention layer's computation with the Ulysses exchange and/or the ring (holds no weights).

    A key mask [B, S_kv] (True: attend) belongs to the keys this rank holds and travels with them:
    Ulysses gathers it as it gathers the keys, the ring hands each key/value shard's part along.
    """

    def __init__(self, ulysses: GroupCoordinator, ring: GroupCoordinator):
        self.ulysses = ulysses
        self.ring = ring

    def __call__(self, attention: Attention, query, key, value, attn_mask):
        if attn_mask is not None and (attn_mask.dim() != 2 or attn_mask.shape != key.shape[:2]):
            raise ValueError(
                f"{attention.prefix or 'attention'}: with sequence parallelism the attention mask must be a key "
                f"mask [B, S_kv] = {tuple(key.shape[:2])} (True: attend), got shape {tuple(attn_mask.shape)}"
            )
        if attn_mask is not None:
            attn_mask = attn_mask.bool()
        if self.ulysses.world_size > 1:
            query, key, value = (sequence_to_heads(t, self.ulysses) for t in (query, key, value))
            if attn_mask is not None:
                attn_mask = gather_key_mask(attn_mask, self.ulysses)
        if self.ring.world_size > 1:
            out = ring_attention(query, key, value, attention.softmax_scale, self.ring, attention.backend, attn_mask)
        else:
            out = attention.compute(query, key, value, attn_mask)
        if self.ulysses.world_size > 1:
            out = heads_to_sequence(out, self.ulysses)
        return out


# -- the plan's hooks --------------------------------------------------------------------------------


def _check_tensor(x: Any, spec: SequenceParallelInput, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"sequence parallel plan: {where} is {type(x).__name__}, expected a tensor")
    if spec.expected_dims is not None and x.dim() != spec.expected_dims:
        raise ValueError(
            f"sequence parallel plan: {where} has {x.dim()} dims (shape {tuple(x.shape)}), the plan expects "
            f"{spec.expected_dims}"
        )
    return x


def pad_to_multiple(x: torch.Tensor, dim: int, multiple: int, value: float | bool = 0) -> torch.Tensor:
    """`x` with `value` appended along `dim` up to the next multiple of `multiple`."""
    missing = -x.shape[dim] % multiple
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _split(x: Any, spec: SequenceParallelInput, group: GroupCoordinator, where: str) -> torch.Tensor:
    x = _check_tensor(x, spec, where)
    if spec.pad:
        x = pad_to_multiple(x, spec.split_dim, group.world_size)
    length = x.shape[spec.split_dim]
    if length % group.world_size:
        raise ValueError(
            f"sequence parallel: {where} has length {length} along dim {spec.split_dim}, which does not divide "
            f"by the sequence parallel degree {group.world_size}; choose a size (or text length) that does"
        )
    return x.chunk(group.world_size, dim=spec.split_dim)[group.rank_in_group].contiguous()


def _split_key_mask(
    mask: Any, sequence: Any, spec: SequenceParallelInput, group: GroupCoordinator, where: str
) -> torch.Tensor | None:
    """Split a [B, S] key mask like the sequence it masks, padding it with False where that sequence is
    padded; None (attend everywhere) stays None unless padding makes a mask necessary."""
    if not isinstance(sequence, torch.Tensor):
        raise ValueError(f"sequence parallel plan: {where} masks input {spec.mask_of!r}, which is not a tensor")
    batch, length = sequence.shape[0], sequence.shape[spec.split_dim]
    if mask is None:
        if length % group.world_size == 0:
            return None
        mask = torch.ones(batch, length, dtype=torch.bool, device=sequence.device)
    mask = _check_tensor(mask, spec, where)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"sequence parallel plan: {where} has shape {tuple(mask.shape)}, but {spec.mask_of!r} holds "
            f"{batch} sequences of {length} tokens"
        )
    mask = pad_to_multiple(mask, 1, group.world_size, value=False)
    return mask.chunk(group.world_size, dim=1)[group.rank_in_group].contiguous()


def _positions(module: nn.Module) -> dict[str, int]:
    """Name -> positional index of a module's forward parameters."""
    params = list(inspect.signature(module.forward).parameters)
    return {name: i for i, name in enumerate(params)}


class _ModuleInputs:
    """A forward call's inputs, by name or position, to read and replace."""

    def __init__(self, module: nn.Module, name: str, args: tuple, kwargs: dict, positions: dict[str, int]):
        self.module, self.name, self.args, self.kwargs, self.positions = module, name, list(args), kwargs, positions

    def where(self, key) -> str:
        return f"{self.name or type(self.module).__name__} input {key!r}"

    def _index(self, key) -> int | None:
        index = key if isinstance(key, int) else self.positions.get(key)
        return index if index is not None and index < len(self.args) else None

    def get(self, key, required: bool = True):
        """The input's value; an input not passed is an error, or None if not `required` (its default)."""
        if key in self.kwargs:
            return self.kwargs[key]
        index = self._index(key)
        if index is None:
            if required or isinstance(key, int) or key not in self.positions:
                raise ValueError(
                    f"sequence parallel plan: {self.where(key)} was not passed to {type(self.module).__name__}"
                )
            return None
        return self.args[index]

    def set(self, key, value) -> None:
        index = None if key in self.kwargs else self._index(key)
        if index is None:
            self.kwargs[key] = value
        else:
            self.args[index] = value


def _install_input_split(module: nn.Module, name: str, specs: dict, group: GroupCoordinator) -> list:
    positions = _positions(module)
    input_specs = {k: s for k, s in specs.items() if not s.split_output}
    output_specs = {k: s for k, s in specs.items() if s.split_output}
    handles = []

    if input_specs:
        def split_inputs(mod, args, kwargs):
            inputs = _ModuleInputs(mod, name, args, kwargs, positions)
            # Masks first: they read the length of their sequence before it is split here too.
            for key, spec in sorted(input_specs.items(), key=lambda item: item[1].mask_of is None):
                if spec.mask_of is not None:  # may be left to its default, None
                    mask = _split_key_mask(
                        inputs.get(key, required=False), inputs.get(spec.mask_of), spec, group, inputs.where(key)
                    )
                    inputs.set(key, mask)
                    continue
                value = inputs.get(key)
                if value is not None:
                    inputs.set(key, _split(value, spec, group, inputs.where(key)))
            return tuple(inputs.args), inputs.kwargs

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
