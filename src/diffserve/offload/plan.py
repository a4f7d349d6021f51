"""Which weights offload moves, grouped the way the pipeline uses them.

From the pipeline's declared components (`SupportsComponentDiscovery`, or the fallback names):
- the encoders (all of them, used together while encoding), each denoiser, and the VAEs: the stages
  model-level offload keeps on the device one at a time;
- each denoiser's blocks in call order (`block_list_attrs`: `_layerwise_offload_blocks_attrs` or the
  ModuleLists of `_repeated_blocks`), which layerwise offload streams, and the rest of the denoiser
  (embedders, final norm and projection), which layerwise offload keeps on the device;
- resident: `_resident_modules`, tensors that two components share, and whatever no component
  covers. These never leave the device.

Plans are made on meta tensors too (the memory estimate runs before the weights are loaded).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from diffserve.models.interface import block_list_attrs, discover_components
from diffserve.offload.weights import tensor_bytes


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of `module` and its children, each object once."""
    found = {id(p): p for p in module.parameters()}
    found.update((id(b), b) for b in module.buffers())
    return list(found.values())


# Bytes a tensor will take on the device: its own size, or what quantization makes of it.
Size = Callable[[torch.Tensor], int]


def total_bytes(tensors: list[torch.Tensor], size: Size = tensor_bytes) -> int:
    return sum(size(t) for t in tensors)


@dataclass
class BlockPlan:
    name: str  # "transformer.transformer_blocks.3"
    module: nn.Module
    tensors: list[torch.Tensor]


@dataclass
class DenoiserPlan:
    path: str
    module: nn.Module
    blocks: list[BlockPlan]  # in call order
    rest: list[torch.Tensor]
    size: Size = tensor_bytes

    @property
    def rest_bytes(self) -> int:
        return total_bytes(self.rest, self.size)

    @property
    def nbytes(self) -> int:
        return self.rest_bytes + sum(total_bytes(b.tensors, self.size) for b in self.blocks)

    @property
    def largest_block_bytes(self) -> int:
        return max((total_bytes(b.tensors, self.size) for b in self.blocks), default=0)


@dataclass
class OffloadPlan:
    encoders: dict[str, list[torch.Tensor]]  # per encoder path, in declared order
    vaes: dict[str, list[torch.Tensor]]
    denoisers: list[DenoiserPlan]
    resident: list[torch.Tensor] = field(default_factory=list)
    encoder_modules: dict[str, nn.Module] = field(default_factory=dict)
    vae_modules: dict[str, nn.Module] = field(default_factory=dict)
    size: Size = tensor_bytes

    @property
    def encoder_bytes(self) -> int:
        return sum(total_bytes(t, self.size) for t in self.encoders.values())

    @property
    def vae_bytes(self) -> int:
        return sum(total_bytes(t, self.size) for t in self.vaes.values())

    @property
    def resident_bytes(self) -> int:
        return total_bytes(self.resident, self.size)


def denoiser_blocks(path: str, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every block of the denoiser's block lists, in call order."""
    return [
        (f"{path}.{attr}.{i}", block)
        for attr in block_list_attrs(transformer)
        for i, block in enumerate(getattr(transformer, attr))
    ]


def plan_offload(pipeline: nn.Module, size: Size = tensor_bytes) -> OffloadPlan:
    """The plan; `size` gives the bytes of each tensor (the estimate of diffserve.offload.budget)."""
    components = discover_components(pipeline)
    resident_ids = {id(t) for m in components["resident"].values() for t in module_tensors(m)}
    # A tensor two components share (tied weights) must be on the device for both: it stays there.
    owners: Counter[int] = Counter()
    for kind in ("encoder", "dit", "vae"):
        for module in components[kind].values():
            owners.update(id(t) for t in module_tensors(module))

    def offloadable(module: nn.Module) -> list[torch.Tensor]:
        return [t for t in module_tensors(module) if id(t) not in resident_ids and owners[id(t)] == 1]

    denoisers = []
    for path, transformer in components["dit"].items():
        blocks = denoiser_blocks(path, transformer)
        in_blocks: Counter[int] = Counter(id(t) for _, block in blocks for t in module_tensors(block))
        own = offloadable(transformer)
        own_ids = {id(t) for t in own}
        # A tensor two blocks share would have to be on the device for both: it stays with the rest.
        block_plans = [
            BlockPlan(name, block, [t for t in module_tensors(block) if id(t) in own_ids and in_blocks[id(t)] == 1])
            for name, block in blocks
        ]
        streamed = {id(t) for b in block_plans for t in b.tensors}
        denoisers.append(DenoiserPlan(path, transformer, block_plans, [t for t in own if id(t) not in streamed], size))

    plan = OffloadPlan(
        encoders={path: offloadable(m) for path, m in components["encoder"].items()},
        vaes={path: offloadable(m) for path, m in components["vae"].items()},
        denoisers=denoisers,
        encoder_modules=dict(components["encoder"]),
        vae_modules=dict(components["vae"]),
        size=size,
    )
    planned = {id(t) for ts in (*plan.encoders.values(), *plan.vaes.values()) for t in ts}
    planned.update(id(t) for d in denoisers for t in d.rest)
    planned.update(id(t) for d in denoisers for b in d.blocks for t in b.tensors)
    plan.resident = [t for t in module_tensors(pipeline) if id(t) not in planned]
    return plan
