"""The process-group registry: the one piece of global state diffserve keeps.

The groups span one replica's worker group (data-parallel replicas are separate process groups that
never communicate). Its ranks are laid out tp (innermost, adjacent ranks) -> sp (ulysses, then ring)
-> cfg -> dp (outermost):

    rank = tp_i + tp * (ulysses_i + ulysses * (ring_i + ring * (cfg_i + cfg * dp_i)))

so tensor-parallel peers, whose collectives run every layer, share the fastest links. `dp` here is
only HSDP's extra ranks (standalone HSDP: ranks that share the weights and repeat the same work); it
is 1 otherwise. Until `initialize_model_parallel` runs (world size 1) every group is the trivial group
of this process, so layers can ask for their rank and world size unconditionally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Inner to outer. "sp" is ulysses x ring together.
_DIMS = ("tp", "ulysses", "ring", "cfg", "dp")


@dataclass
class GroupCoordinator:
    """One parallel dimension: the global ranks in it, this process's place, and its collectives."""

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
        """Concatenate every rank's `x` along `dim`, in rank order."""
        if self.world_size == 1:
            return x
        dim = dim % x.dim()
        out = torch.empty((self.world_size * x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        # [world * d0, ...] -> [world, d0, ..., d, ...] -> [d0, ..., world * d, ...]
        return out.view((self.world_size,) + x.shape).movedim(0, dim).flatten(dim, dim + 1)

    def broadcast_object(self, obj=None, src: int = 0):
        """Send a picklable object from group rank `src` to every rank of the group."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=self.ranks[src], group=self.group)
        return holder[0]


def _single(name: str) -> GroupCoordinator:
    return GroupCoordinator(name=name, ranks=[0])


_GROUPS: dict[str, GroupCoordinator] = {
    name: _single(name) for name in ("tp", "sp", "ulysses", "ring", "cfg", "dp", "vae", "world", "control")
}
_HSDP_MESH = None


def get_tp_group() -> GroupCoordinator:
    return _GROUPS["tp"]


def get_sp_group() -> GroupCoordinator:
    return _GROUPS["sp"]


def get_ulysses_group() -> GroupCoordinator:
    return _GROUPS["ulysses"]


def get_ring_group() -> GroupCoordinator:
    return _GROUPS["ring"]


def get_cfg_group() -> GroupCoordinator:
    return _GROUPS["cfg"]


def get_dp_group() -> GroupCoordinator:
    return _GROUPS["dp"]


def get_vae_group() -> GroupCoordinator:
    """The ranks that share one tiled VAE decode (consecutive blocks of vae_patch_parallel_size)."""
    return _GROUPS["vae"]


def get_world_group() -> GroupCoordinator:
    return _GROUPS["world"]


def get_control_group() -> GroupCoordinator:
    """Every rank, over gloo on the host: decisions all ranks must take together (stop a request at
    this step) cost a few microseconds there and never synchronize a GPU stream."""
    return _GROUPS["control"]


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (every rank must call this at the same point)."""
    control = get_control_group()
    if control.world_size == 1:
        return flag
    votes = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=control.group)
    return bool(votes.item())  # a host tensor: no device synchronization


def get_hsdp_mesh():
    """The (replicate, shard) DeviceMesh when HSDP is on, else None."""
    return _HSDP_MESH


def get_tensor_model_parallel_world_size() -> int:
    return get_tp_group().world_size


def get_tensor_model_parallel_rank() -> int:
    return get_tp_group().rank_in_group


def model_parallel_is_initialized() -> bool:
    return get_world_group().world_size > 1


def rank_groups(sizes: dict[str, int], dims: tuple[str, ...]) -> list[list[int]]:
    """All groups of global ranks that vary along `dims` (others fixed), for the layout above."""
    shape = [sizes[d] for d in reversed(_DIMS)]  # outermost first, as torch lays memory out
    grid = torch.arange(torch.Size(shape).numel()).reshape(shape)
    axes = [len(_DIMS) - 1 - _DIMS.index(d) for d in dims]
    rest = [a for a in range(len(_DIMS)) if a not in axes]
    # Keep the inner dimension fastest inside a group (ulysses before ring within sp).
    grid = grid.permute(rest + sorted(axes))
    group_size = 1
    for d in dims:
        group_size *= sizes[d]
    return grid.reshape(-1, group_size).tolist()


def init_distributed_environment(
    rank: int, world_size: int, backend: str, init_method: str = "env://", timeout_s: float = 600.0
) -> None:
    if dist.is_initialized():
        return
    dist.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )


def initialize_model_parallel(parallel_config, device_type: str) -> None:
    """Create every group this process belongs to. All ranks must call it, in the same order."""
    global _HSDP_MESH
    world_size = dist.get_world_size()
    # One process group is one replica: data-parallel replicas never communicate.
    if world_size != parallel_config.replica_world_size:
        raise ValueError(
            f"the parallel config needs {parallel_config.replica_world_size} processes per replica "
            f"(tp x ulysses x ring x cfg), but the process group has {world_size}"
        )
    rank = dist.get_rank()
    sizes = {
        "tp": parallel_config.tensor_parallel_size,
        "ulysses": parallel_config.ulysses_degree,
        "ring": parallel_config.ring_degree,
        "cfg": parallel_config.cfg_parallel_size,
        # Ranks beyond tp x sp x cfg (standalone HSDP) are replicas running the same work.
        "dp": world_size // (
            parallel_config.tensor_parallel_size * parallel_config.sequence_parallel_size
            * parallel_config.cfg_parallel_size
        ),
    }
    for name, dims in (
        ("tp", ("tp",)),
        ("ulysses", ("ulysses",)),
        ("ring", ("ring",)),
        ("sp", ("ulysses", "ring")),
        ("cfg", ("cfg",)),
        ("dp", ("dp",)),
        ("world", _DIMS),
    ):
        groups = rank_groups(sizes, dims)
        if len(groups[0]) == 1:
            _GROUPS[name] = GroupCoordinator(name=name, ranks=[rank])
            continue
        for ranks in groups:
            # Every rank must take part in creating every group, even those it is not in.
            group = dist.new_group(ranks) if name != "world" else dist.group.WORLD
            if rank in ranks:
                _GROUPS[name] = GroupCoordinator(name=name, ranks=ranks, rank_in_group=ranks.index(rank), group=group)
    world_ranks = list(range(world_size))
    control = dist.new_group(world_ranks, backend="gloo") if world_size > 1 else None
    _GROUPS["control"] = GroupCoordinator("control", ranks=world_ranks, rank_in_group=rank, group=control)
    # VAE patch parallel is not a dimension of the layout: consecutive blocks of ranks each decode
    # the (identical) latents together.
    vae_size = parallel_config.vae_patch_parallel_size
    _GROUPS["vae"] = GroupCoordinator(name="vae", ranks=[rank])
    if vae_size > 1:
        for start in range(0, world_size, vae_size):
            ranks = list(range(start, start + vae_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                _GROUPS["vae"] = GroupCoordinator("vae", ranks=ranks, rank_in_group=ranks.index(rank), group=group)
    if parallel_config.use_hsdp:
        from torch.distributed.device_mesh import init_device_mesh

        replicate, shard = parallel_config.hsdp_replicate_size, parallel_config.resolved_hsdp_shard_size
        if replicate == 1:
            _HSDP_MESH = init_device_mesh(device_type, (shard,), mesh_dim_names=("shard",))
        else:
            _HSDP_MESH = init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
    logger.info(
        "rank %d: tp %s, sp %s, cfg %s, dp %s",
        rank,
        _GROUPS["tp"].ranks,
        _GROUPS["sp"].ranks,
        _GROUPS["cfg"].ranks,
        _GROUPS["dp"].ranks,
    )


def destroy_model_parallel() -> None:
    global _HSDP_MESH
    for name in list(_GROUPS):
        _GROUPS[name] = _single(name)
    _HSDP_MESH = None
    if dist.is_initialized():
        dist.destroy_process_group()
