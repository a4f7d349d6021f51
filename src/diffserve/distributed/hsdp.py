"""HSDP: shard the denoisers' repeated blocks with FSDP2 across a (replicate, shard) device mesh.

A model declares which submodules to shard with `_hsdp_shard_conditions` (predicates on name and
module), or leaves it to the default, its `_repeated_blocks`; the engine applies `fully_shard` to each match, then to the denoiser itself for the rest,
after the full weights were loaded on the CPU, so a rank only ever holds a full block transiently.
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


def apply_hsdp(pipeline: nn.Module, mesh, device: torch.device) -> None:
    if mesh is None:
        raise RuntimeError("HSDP was asked for but no device mesh was initialized")
    for path, module in discover_components(pipeline)["dit"].items():
        count = shard_module(module, mesh)
        logger.info("HSDP: sharded %d blocks of %s over mesh %s", count, path, tuple(mesh.shape))
    # FSDP2 moved the denoisers to the mesh's device; encoders and VAE follow, replicated.
    pipeline.to(device)
