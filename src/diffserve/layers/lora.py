"""LoRA on our linear layers: several adapters resident at once, applied unmerged.

A `LoRAStack` attaches to one linear layer (`layer.lora`) and holds, per loaded adapter, a down
projection A [rank, in] and an up projection B [out, rank] of this rank's shard, so that the layer
computes  y = x W^T (+ b) + sum_i  s_i * B_i A_i x  for the adapters a request selects, with the base
weight W untouched. Requests with other adapters (or none) then alternate without any reloading.

Sharding follows the layer, through its own `weight_loader` (the one that loads W):
- column-parallel layers (and their fused forms) split B by output rows; A is whole on every rank;
- row-parallel layers split A by input columns; B is whole, and the partial update joins the
  layer's reduction, so no collective is added;
- fused layers (QKV, merged columns) take one adapter per part: part j's A goes into its own block of
  rows of the layer's A and its B into that block's columns and part j's output rows. Parts that share
  one A (a kohya fused qkv adapter split by name) share the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffserve.layers.linear import ColumnParallelLinear, LinearBase, MergedColumnParallelLinear, RowParallelLinear
from diffserve.loader.weight_utils import WeightLoadingError


@dataclass(frozen=True)
class LoRAPart:
    """One adapter's update of one layer, or of one part of a fused layer, as the file holds it (full,
    unsharded): delta W = scale * up @ down."""

    down: torch.Tensor  # A [rank, in_features]
    up: torch.Tensor  # B [out_features of the part, rank]
    scale: float  # alpha / rank as the adapter was trained (1.0 without alpha)
    shard_id: int | str | None = None  # the part of a fused layer; None: the whole layer


@dataclass
class _Resident:
    down: torch.Tensor  # [rank, in_local]
    up: torch.Tensor  # [out_local, rank], the adapter's alpha scale folded in


class LoRAStack:
    """The adapters resident on one layer, and the ones active for the batch now running."""

    def __init__(self) -> None:
        self.adapters: dict[int, _Resident] = {}
        # (A, B) of the active adapters, their request scales folded into A; None: no update.
        self.active: tuple[torch.Tensor, torch.Tensor] | None = None

    def to(self, device: torch.device) -> None:
        """Keep every adapter on `device` (the layer's weights may be elsewhere: CPU offload)."""
        for adapter in self.adapters.values():
            adapter.down, adapter.up = adapter.down.to(device), adapter.up.to(device)
        if self.active is not None:
            self.active = tuple(t.to(device) for t in self.active)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return y
        down, up = self.active
        return y.add_(F.linear(F.linear(x, down), up))

    def activate(self, selection: list[tuple[int, float]]) -> None:
        """Make the adapters `[(index, scale), ...]` active (those not on this layer are skipped)."""
        chosen = [(self.adapters[i], scale) for i, scale in selection if i in self.adapters]
        if not chosen:
            self.active = None
        elif len(chosen) == 1 and chosen[0][1] == 1:
            self.active = (chosen[0][0].down, chosen[0][0].up)
        else:
            # Several adapters become one of summed rank: [A_1; A_2] and [B_1, B_2].
            down = torch.cat([a.down * scale for a, scale in chosen])
            self.active = (down, torch.cat([a.up for a, _ in chosen], dim=1))


def attach_lora(
    layer: LinearBase, index: int, parts: list[LoRAPart], what: str, dtype: torch.dtype | None = None
) -> LoRAStack:
    """Place adapter `index`'s parts on `layer` (this rank's shard) in `dtype`, the activations' (None:
    the weight's; a quantized weight is not); `what` names it in errors."""
    if not isinstance(layer, LinearBase):
        raise WeightLoadingError(
            f"{what} is a {type(layer).__name__}, not a linear layer: LoRA applies to linear layers"
        )
    if layer.lora is None:
        layer.lora = LoRAStack()
    if index in layer.lora.adapters:
        raise WeightLoadingError(f"{what}: this adapter already has an update for this layer")
    for part in parts:
        _check_part_shapes(layer, part, what)
    down, up = _place_parts(layer, parts, what, dtype or layer.weight.dtype)
    layer.lora.adapters[index] = _Resident(down=down, up=up)
    return layer.lora


def _part_output_size(layer: LinearBase, part: LoRAPart, what: str) -> int:
    if part.shard_id is None:
        return layer.output_size
    if not isinstance(layer, MergedColumnParallelLinear):
        raise WeightLoadingError(f"{what}: part {part.shard_id!r} given for a layer that is not fused")
    return layer.output_sizes[layer._shard_index(part.shard_id)]


def _check_part_shapes(layer: LinearBase, part: LoRAPart, what: str) -> None:
    down, up = part.down, part.up
    label = what if part.shard_id is None else f"{what} (part {part.shard_id!r})"
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise WeightLoadingError(
            f"{label}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} are not a [rank, in] / [out, rank] pair"
        )
    out_size = _part_output_size(layer, part, what)
    if down.shape[1] != layer.input_size or up.shape[0] != out_size:
        raise WeightLoadingError(
            f"{label}: the adapter maps {down.shape[1]} -> {up.shape[0]} features, but the layer maps "
            f"{layer.input_size} -> {out_size}; the adapter was trained for another model"
        )


def _blocks_by_shared_down(parts: list[LoRAPart]) -> list[list[LoRAPart]]:
    """Group parts whose A is the same matrix (a fused kohya adapter split per part): one block each."""
    blocks: list[list[LoRAPart]] = []
    for part in parts:
        for block in blocks:
            first = block[0].down
            if first.shape == part.down.shape and torch.equal(first, part.down):
                block.append(part)
                break
        else:
            blocks.append([part])
    return blocks


def _place_parts(
    layer: LinearBase, parts: list[LoRAPart], what: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's A [sum of block ranks, in_local] and B [out_local, sum of block ranks]."""
    device = layer.weight.device
    out_local, in_local = _local_shape(layer)
    blocks = _blocks_by_shared_down(parts)
    ranks = [block[0].down.shape[0] for block in blocks]
    down = torch.empty(sum(ranks), in_local, dtype=dtype, device=device)
    up = torch.zeros(out_local, sum(ranks), dtype=dtype, device=device)
    start = 0
    for block, rank in zip(blocks, ranks):
        down[start : start + rank] = _shard_down(layer, block[0].down.to(device=device, dtype=torch.float32), what)
        for part in block:
            scaled_up = part.up.to(device=device, dtype=torch.float32) * part.scale
            up[:, start : start + rank] += _shard_up(layer, scaled_up, part.shard_id, what).to(dtype)
        start += rank
    return down, up


def _local_shape(layer: LinearBase) -> tuple[int, int]:
    if isinstance(layer, RowParallelLinear):
        return layer.output_size, layer.input_size_per_partition
    if isinstance(layer, ColumnParallelLinear):
        return layer.output_size_per_partition, layer.input_size
    return layer.output_size, layer.input_size


def _call_layer_loader(layer: LinearBase, target: torch.Tensor, full: torch.Tensor, what: str, *shard) -> None:
    try:
        layer.weight_loader(target, full, *shard)
    except WeightLoadingError as exc:
        raise WeightLoadingError(f"{what}: {exc}") from None


def _shard_down(layer: LinearBase, down: torch.Tensor, what: str) -> torch.Tensor:
    """A row-parallel layer's input columns are split (the layer's loader takes the slice it takes
    of W); every other layer sees its whole input."""
    if not isinstance(layer, RowParallelLinear):
        return down
    target = torch.empty(down.shape[0], layer.input_size_per_partition, dtype=down.dtype, device=down.device)
    _call_layer_loader(layer, target, down, what)
    return target


def _shard_up(layer: LinearBase, up: torch.Tensor, shard_id, what: str) -> torch.Tensor:
    """This rank's output rows of B, at the rows of the part it updates (zeros elsewhere)."""
    if not isinstance(layer, ColumnParallelLinear):
        return up
    target = torch.zeros(layer.output_size_per_partition, up.shape[1], dtype=up.dtype, device=up.device)
    shard = () if shard_id is None else (shard_id,)
    _call_layer_loader(layer, target, up, what, *shard)
    return target
