"""Layerwise offload: a denoiser's blocks live in (pinned) host memory and pass through the device one
at a time, `prefetch` blocks ahead of the one running, copied on a side stream while it computes.

Per call of the denoiser, with blocks numbered in call order:
- the call starts: the first block is made ready (a step cache reads its weights before it runs, to
  decide), and the next `prefetch` are on their way;
- block i starts: blocks before i still on the device are let go (a cache skipped them, or they were
  fetched and not used), block i is made ready (fetched now if it is not there), and blocks i+1 ..
  i+prefetch are fetched;
- block i ends: it is let go;
- the call ends (also by an exception): everything is let go, and the first `prefetch` blocks of the
  next call are fetched while the step finishes.
So at most prefetch + 1 blocks of a denoiser are on the device. The rest of the denoiser stays there;
under TP or sequence parallelism each rank streams the blocks it holds (its shard).

Resident blocks (`layerwise_resident_blocks=N`): N blocks of each denoiser stay on the device and are
not streamed, spread evenly through the call order (`resident_block_indices`), so that the compute of
the resident blocks between two streamed ones hides the copy of the next streamed one. (Kept together
at the start, they would compute while only `prefetch` blocks are copied, and the streamed blocks after
them would each wait for their own copy.) The streamer sees only the streamed blocks: "ahead" and
"before" count streamed blocks.
"""

from __future__ import annotations

import torch.nn as nn

from diffserve.offload.weights import Transfers, WeightSet


def resident_block_indices(num_blocks: int, resident: int, where: str = "the denoiser") -> list[int]:
    """The call-order indices of the `resident` blocks kept on the device, spread evenly."""
    if resident >= num_blocks and resident > 0:
        raise ValueError(
            f"layerwise_resident_blocks={resident} would keep all {num_blocks} blocks of {where} on the device, "
            f"so nothing would stream; use fewer than {num_blocks}, or enable_cpu_offload, or no offload"
        )
    return sorted({int((i + 0.5) * num_blocks / resident) for i in range(resident)})


class BlockStreamer:
    def __init__(self, name: str, sets: list[WeightSet], transfers: Transfers, prefetch: int):
        if prefetch < 0:
            raise ValueError(f"layerwise prefetch must be >= 0 blocks, got {prefetch}")
        self.name = name
        self.sets = sets
        self.transfers = transfers
        self.prefetch = prefetch

    @property
    def device_bytes(self) -> int:
        """The most this denoiser's blocks hold on the device at once."""
        return (self.prefetch + 1) * max((ws.nbytes for ws in self.sets), default=0)

    def resident_blocks(self) -> list[int]:
        return [i for i, ws in enumerate(self.sets) if ws.resident]

    def _fetch_ahead(self, after: int) -> None:
        for j in range(after + 1, min(after + 1 + self.prefetch, len(self.sets))):
            self.transfers.load(self.sets[j])

    def begin_call(self) -> None:
        # Only what the previous call fetched for this one may be here (an aborted call's leftovers go).
        for i in self.resident_blocks():
            if i >= self.prefetch:
                self.transfers.release(self.sets[i])
        self.transfers.load(self.sets[0], wait=True)
        self._fetch_ahead(0)

    def before_block(self, i: int) -> None:
        for j in self.resident_blocks():
            if j < i:
                self.transfers.release(self.sets[j])
        self.transfers.load(self.sets[i], wait=True)
        self._fetch_ahead(i)

    def after_block(self, i: int) -> None:
        self.transfers.release(self.sets[i])

    def end_call(self) -> None:
        self.release_all()
        for j in range(min(self.prefetch, len(self.sets))):
            self.transfers.load(self.sets[j])

    def release_all(self) -> None:
        for i in self.resident_blocks():
            self.transfers.release(self.sets[i])

    def install_block_hooks(self, hooks, blocks: list[nn.Module]) -> None:
        """Hooks on each block (`blocks[i]` holds `sets[i]`); the denoiser's own hooks call begin_call and
        end_call (see diffserve.offload.model_level)."""
        for i, block in enumerate(blocks):
            hooks.before_forward(block, lambda module, args, kwargs, i=i: self.before_block(i))
            hooks.after_forward(block, lambda module, i=i: self.after_block(i))
