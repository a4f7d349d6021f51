"""Loading straight into HSDP shards: each rank reads only the rows of each tensor it keeps.

Under HSDP the denoisers are sharded (FSDP2, each parameter split by rows over the shard group) while
still on the meta device, and every rank then allocates only its rows. A parameter's `weight_loader`
is written for a whole parameter: it checks shapes, narrows its target (a fused QKV's q, k or v rows)
and copies. `ShardWindow` stands in for the parameter while it runs: it has the whole parameter's
shape and narrows like it, but a copy into it takes from the checkpoint tensor only the rows inside
this rank's shard. Checkpoint tensors are memory-mapped, so the other rows are never read, and no
rank ever holds a full copy of a sharded weight, on the host or on the device.
"""

from __future__ import annotations

import torch

from diffserve.loader.weight_utils import WeightLoadingError


def row_shard(param: torch.Tensor) -> tuple[int, int] | None:
    """(first row, row count) of the whole parameter that this rank holds, for a DTensor split by rows
    over one mesh dimension (FSDP2's layout); None for an ordinary tensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # a build without torch.distributed
        return None
    if not isinstance(param, DTensor):
        return None
    sharded = [(dim, p) for dim, p in enumerate(param.placements) if not isinstance(p, Replicate)]
    if len(sharded) != 1 or not isinstance(sharded[0][1], Shard) or sharded[0][1].dim != 0:
        raise WeightLoadingError(
            f"sharded loading handles parameters split by rows over one mesh dimension, not placements "
            f"{param.placements}"
        )
    mesh_dim = sharded[0][0]
    ranks = param.device_mesh.size(mesh_dim)
    coordinate = param.device_mesh.get_coordinate()[mesh_dim]
    rows = param.shape[0]
    per_rank = -(-rows // ranks)  # torch.chunk's split, as FSDP2 uses
    start = min(coordinate * per_rank, rows)
    count = min(rows, start + per_rank) - start
    if param.to_local().shape[0] != count:
        raise WeightLoadingError(
            f"a parameter of {tuple(param.shape)} holds {param.to_local().shape[0]} rows on this rank, "
            f"expected {count} (rows {start}..{start + count} of a chunked split over {ranks} ranks)"
        )
    return start, count


class ShardWindow:
    """A view, `rows` rows from row `offset` of a row-sharded parameter, that a weight_loader can
    narrow (along rows) and copy into; only the rows this rank holds are written."""

    def __init__(self, local: torch.Tensor, full_shape: torch.Size, local_start: int, offset: int = 0,
                 rows: int | None = None):
        self.local = local
        self.local_start = local_start
        self.offset = offset
        rows = full_shape[0] if rows is None else rows
        self.shape = torch.Size([rows, *full_shape[1:]])
        self.dtype = local.dtype
        self.device = local.device

    @classmethod
    def of(cls, param: torch.Tensor) -> "ShardWindow | torch.Tensor":
        """The window a loader fills for `param`: `param` itself unless it is row-sharded."""
        shard = row_shard(param)
        if shard is None:
            return param
        with torch.no_grad():  # a parameter that still requires grad gives a view autograd would track
            local = param.to_local()
        return cls(local, param.shape, shard[0])

    @property
    def data(self) -> "ShardWindow":
        return self

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def narrow(self, dim: int, start: int, length: int) -> "ShardWindow":
        if dim != 0:
            raise WeightLoadingError(
                f"a weight_loader narrowed dim {dim} of a row-sharded (HSDP) parameter; sharded loading "
                "supports narrowing rows (dim 0) only"
            )
        if start < 0 or start + length > self.shape[0]:
            raise WeightLoadingError(
                f"narrow({start}, {length}) is outside the {self.shape[0]} rows of {tuple(self.shape)}"
            )
        return ShardWindow(self.local, self.shape, self.local_start, self.offset + start, length)

    def copy_(self, src: torch.Tensor) -> "ShardWindow":
        if tuple(src.shape) != tuple(self.shape):
            raise WeightLoadingError(f"cannot copy a tensor of shape {tuple(src.shape)} into {tuple(self.shape)}")
        first = max(self.offset, self.local_start)
        last = min(self.offset + self.shape[0], self.local_start + self.local.shape[0])
        if first < last:
            rows = slice(first - self.offset, last - self.offset)
            with torch.no_grad():
                self.local[first - self.local_start : last - self.local_start].copy_(src[rows])
        return self

    def __getattr__(self, name: str):
        raise WeightLoadingError(
            f"a weight_loader used `.{name}` on a row-sharded (HSDP) parameter; sharded loading supports "
            "shape, narrow(0, ...) and copy_ (see diffserve.loader.sharded)"
        )
