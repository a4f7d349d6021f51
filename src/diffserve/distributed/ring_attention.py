"""Ring attention: each rank keeps its query shard and the key/value shards travel around the ring.

With R ranks, rank r holds the r-th part of q, k and v. In R rounds it attends its q to the k/v part
it currently holds, while (overlapped) handing that part on to rank r+1 and taking the next one from
rank r-1. Each round gives a partial output and its log-sum-exp (LSE); merging partials by LSE is the
exact softmax over all keys, so the result equals full attention up to rounding, in any key order.

Unlike Ulysses it needs no head divisibility and never holds the whole sequence, at the price of R
rounds of point-to-point traffic that overlap with the attention kernels. Combined with Ulysses
(USP), the Ulysses all-to-all runs first, inside each ring position (see sequence_parallel.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffserve.distributed.parallel_state import GroupCoordinator
from diffserve.layers.attention.backends import AttentionBackend, TorchSDPABackend


def merge_partial(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor):
    """Combine two softmax-attention partials over disjoint key sets.

    out/part: [B, S, H, D] (float32), lse/part_lse: [B, H, S] (float32). Each partial is weighted by its
    share of the total softmax mass, exp(lse_i - lse_total).
    """
    total = torch.logaddexp(lse, part_lse)
    keep = torch.exp(lse - total).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    take = torch.exp(part_lse - total).transpose(1, 2).unsqueeze(-1)
    return out * keep + part * take, total


def merge_masked_partial(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor):
    """merge_partial for partials over masked keys: a partial whose keys were all masked has lse -inf
    and weighs nothing, also when every partial so far had none (where merge_partial would take
    exp(-inf - -inf) = NaN)."""
    total = torch.logaddexp(lse, part_lse)
    reference = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    keep = torch.exp(lse - reference).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(part_lse - reference).transpose(1, 2).unsqueeze(-1)
    return out * keep + part * take, total


class _KVRing:
    """Sends this rank's packed k/v to the next rank and receives the previous rank's, asynchronously."""

    def __init__(self, group: GroupCoordinator):
        rank, size = group.rank_in_group, group.world_size
        self.group = group
        self.next_rank = group.ranks[(rank + 1) % size]
        self.prev_rank = group.ranks[(rank - 1) % size]
        self._requests = []

    def start(self, kv: torch.Tensor) -> torch.Tensor:
        incoming = torch.empty_like(kv)
        ops = [
            dist.P2POp(dist.isend, kv, self.next_rank, group=self.group.group),
            dist.P2POp(dist.irecv, incoming, self.prev_rank, group=self.group.group),
        ]
        self._requests = dist.batch_isend_irecv(ops)
        return incoming

    def wait(self) -> None:
        for request in self._requests:
            request.wait()
        self._requests = []


# P2P calls cannot be traced; the attention kernels inside run eagerly either way, so the compiled
# block simply calls this function between its traced halves.
@torch.compiler.disable
def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    group: GroupCoordinator,
    backend: type[AttentionBackend] = TorchSDPABackend,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of this rank's queries over the keys/values of every rank in `group`. [B, S, H, D].

    `key_mask` [B, S_kv] (True: attend) masks this rank's keys; each shard is attended with its own
    part of the mask (every rank's part is gathered once, up front: it is small).
    """
    if not backend.supports_lse or (key_mask is not None and not backend.supports_mask):
        backend = TorchSDPABackend
    masks = None
    if key_mask is not None:
        # [R, B, S_kv]: the mask of ring rank r's keys at index r.
        masks = group.all_gather(key_mask.to(torch.uint8).unsqueeze(0), dim=0).bool()
    ring = _KVRing(group)
    kv = torch.stack((key, value)).contiguous()  # one message per round instead of two
    out = lse = None
    for step in range(group.world_size):
        incoming = ring.start(kv) if step < group.world_size - 1 else None
        if masks is None:
            part, part_lse = backend.forward_with_lse(query, kv[0], kv[1], scale)
        else:
            # After `step` rounds this rank holds the keys of ring rank (rank - step).
            shard_mask = masks[(group.rank_in_group - step) % group.world_size]
            part, part_lse = backend.forward_with_lse(query, kv[0], kv[1], scale, key_mask=shard_mask)
        part = part.float()
        if out is None:
            out, lse = part, part_lse
        elif masks is None:
            out, lse = merge_partial(out, lse, part, part_lse)
        else:
            out, lse = merge_masked_partial(out, lse, part, part_lse)
        if incoming is not None:
            ring.wait()
            kv = incoming
    return out.to(query.dtype)
