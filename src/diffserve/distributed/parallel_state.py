"""The process-group registry: the one piece of global state diffserve keeps.

Groups are ordered tp -> sp -> cfg -> dp. Until `initialize_model_parallel` runs (world size 1, or a
single-process engine) every group is the trivial group of this process alone, so layers can ask
for their rank and world size unconditionally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinator:
    """One parallel dimension: the ranks in it, this process's place, and its collectives."""

    name: str
    ranks: list[int]
    rank_in_group: int = 0
    group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        dim = dim % x.dim()
        out = torch.empty((self.world_size,) + x.shape, dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        # [world, ..., d, ...] -> [..., world * d, ...]
        return out.movedim(0, dim).flatten(dim, dim + 1)


def _single(name: str) -> GroupCoordinator:
    return GroupCoordinator(name=name, ranks=[0])


_TP = _single("tp")
_SP = _single("sp")
_CFG = _single("cfg")
_DP = _single("dp")


def get_tp_group() -> GroupCoordinator:
    return _TP


def get_sp_group() -> GroupCoordinator:
    return _SP


def get_cfg_group() -> GroupCoordinator:
    return _CFG


def get_dp_group() -> GroupCoordinator:
    return _DP


def get_tensor_model_parallel_world_size() -> int:
    return _TP.world_size


def get_tensor_model_parallel_rank() -> int:
    return _TP.rank_in_group
