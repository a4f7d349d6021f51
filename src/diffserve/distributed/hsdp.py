"""HSDP: shard the denoisers' repeated blocks with FSDP2 across a (replicate, shard) device mesh.

A model declares which submodules to shard with `_hsdp_shard_conditions` (predicates on name and
module), or leaves it to the default, its `_repeated_blocks`; the engine applies `fully_shard` to each
match, then to the denoiser itself for the rest. It does so while the denoisers are still on the meta
device (`shard_denoisers`, called by the loader between building and filling the pipeline): each rank
then allocates only its shards and the loader fills them from the rows of the checkpoint it keeps
(diffserve.loader.sharded), so no rank ever holds the full weights, on the host or on the device.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from diffserve.models.interface import discover_components, hsdp_shard_conditions

logger = logging.getLogger(__name__)


def shard_module(module: nn.Module, mesh) -> int:
    from torch.distributed.fsdp import fully_shard

    conditions = hsdp_shard_conditions(module)
    if not conditions:
        raise ValueError(
            f"{type(module).__name__} declares neither _repeated_blocks nor _hsdp_shard_conditions, so HSDP "
            "cannot tell which blocks to shard"
        )
    matches = [(name, sub) for name, sub in module.named_modules() if any(c(name, sub) for c in conditions)]
    if not matches:
        raise ValueError(f"no submodule of {type(module).__name__} matches its _hsdp_shard_conditions")
    for _, sub in matches:
        fully_shard(sub, mesh=mesh, reshard_after_forward=True)
    # The root takes what is left (embedders, final norm and projection), gathered once per forward.
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return len(matches)


def _weight_loaders(module: nn.Module) -> dict[str, object]:
    return {name: p.weight_loader for name, p in module.named_parameters() if hasattr(p, "weight_loader")}


def shard_denoisers(pipeline: nn.Module, mesh, device: torch.device) -> None:
    """Shard every denoiser over `mesh`; denoisers still on the meta device get storage on `device` for
    this rank's shards only (the loader fills them next)."""
    if mesh is None:
        raise RuntimeError("HSDP was asked for but no device mesh was initialized")
    for path, module in discover_components(pipeline)["dit"].items():
        # FSDP2 replaces the parameters with sharded ones: their weight loaders are carried over by name.
        loaders = _weight_loaders(module)
        on_meta = any(p.is_meta for p in module.parameters())
        count = shard_module(module, mesh)
        if on_meta:
            module.to_empty(device=device)
        for name, param in module.named_parameters():
            if name in loaders:
                param.weight_loader = loaders[name]
        logger.info("HSDP: sharded %d blocks of %s over mesh %s", count, path, tuple(mesh.shape))
