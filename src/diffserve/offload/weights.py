"""Weights that live in host memory and visit the device.

A `WeightSet` is the parameters and buffers of some modules (a text encoder, one transformer block).
Their host copies are packed into a few large host buffers, pinned when the device is a GPU (so a copy
is one asynchronous DMA), and while the set is offloaded each tensor's `.data` is a view of them.
`Transfers.load` allocates one device buffer per host buffer, copies into it on a side stream, and
points the tensors at views of it; `Transfers.release` points them back at the host copies: weights
are read-only at inference, so nothing is ever copied back, and releasing is free.

Swapping `.data` keeps every Parameter and buffer object, which step caches, compiled blocks and hooks
hold on to. On a CPU device the same happens between two host buffers, so the logic (what is loaded
when, in which order, and when it is let go) runs and is tested without a GPU.

Stream rules (CUDA), so that nothing ever syncs the host:
- device buffers are allocated on the compute stream, and the side stream waits for the compute stream
  before copying into them (the memory may have been freed by compute work just before);
- the compute stream waits for a set's copy (`wait`) before the first kernel that reads it;
- before a set's device memory is let go, the compute stream waits for its copy, so the allocator never
  hands memory still being written to a compute kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

# Each tensor starts at a multiple of this in its buffer: any dtype can view it, and copies stay aligned.
ALIGN = 512
# Host buffers hold at most this much (a single larger tensor gets a buffer of its own): packing then
# needs at most one buffer's worth of extra host memory at a time.
CHUNK_BYTES = 1 << 30


# Host buffers start on a page: cudaHostRegister pins whole pages.
PAGE = 4096


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _page_aligned_buffer(nbytes: int) -> torch.Tensor:
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, device="cpu")
    shift = -raw.data_ptr() % PAGE
    return raw[shift : shift + nbytes]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _Chunk:
    """One host buffer and the tensors packed into it: (tensor, byte offset)."""

    host: torch.Tensor
    items: list[tuple[torch.Tensor, int]] = field(default_factory=list)


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = tensor_bytes(like)
    return buffer[offset : offset + nbytes].view(like.dtype).view(like.shape)


def _plan_chunks(tensors: list[torch.Tensor]) -> list[tuple[int, list[tuple[torch.Tensor, int]]]]:
    """[(buffer size, [(tensor, offset)])], tensors in order, each buffer at most CHUNK_BYTES unless one
    tensor alone is larger."""
    plans: list[tuple[int, list[tuple[torch.Tensor, int]]]] = []
    size, items = 0, []
    for t in tensors:
        start = _align(size)
        if items and start + tensor_bytes(t) > CHUNK_BYTES:
            plans.append((size, items))
            start, items = 0, []
        items.append((t, start))
        size = start + tensor_bytes(t)
    if items:
        plans.append((size, items))
    return plans


class HostPinning:
    """Page-locks host buffers in place (cudaHostRegister), so they cost exactly their size.

    `Tensor.pin_memory()` would copy each buffer into PyTorch's pinned pool, which rounds allocations up
    to a power of two: up to twice the host memory for a model's weights.
    """

    def __init__(self) -> None:
        # Holding the buffers keeps their memory alive for as long as it is registered.
        self._registered: list[torch.Tensor] = []

    def pin(self, buffer: torch.Tensor) -> bool:
        if buffer.numel() == 0:
            return False
        cudart = torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
        if error != 0:
            logger.warning(
                "could not pin %d bytes of host memory for offloaded weights (cudaError %d); their copies to "
                "the GPU will not overlap with compute", buffer.numel(), error,
            )
            return False
        self._registered.append(buffer)
        return True

    def holds(self, buffer: torch.Tensor) -> bool:
        """Whether `buffer` is page-locked by this object. (`Tensor.is_pinned()` on torch 2.11 does not
        report memory registered with cudaHostRegister, only PyTorch's own pinned pool.)"""
        return any(b.data_ptr() == buffer.data_ptr() for b in self._registered)

    def unpin_all(self) -> None:
        cudart = torch.cuda.cudart() if self._registered else None
        for buffer in self._registered:
            cudart.cudaHostUnregister(buffer.data_ptr())
        self._registered = []

    def __del__(self) -> None:
        # Unregister before the buffers can be freed: freed memory left registered would make a later
        # registration of the same addresses fail (an engine restarted in this process).
        try:
            self.unpin_all()
        except Exception:  # interpreter shutdown
            pass


class WeightSet:
    """Parameters and buffers moved to and from the device together; see the module docstring.

    Building one packs the tensors' current values (on the host) into host buffers and points the
    tensors at them: from then on the set is offloaded.
    """

    def __init__(self, name: str, tensors: Iterable[torch.Tensor], pinning: HostPinning | None = None):
        self.name = name
        unique = {id(t): t for t in tensors}
        self.tensors = list(unique.values())
        self.nbytes = sum(tensor_bytes(t) for t in self.tensors)
        self.chunks: list[_Chunk] = []
        with torch.inference_mode(False), torch.no_grad():
            for size, items in _plan_chunks(self.tensors):
                chunk = _Chunk(_page_aligned_buffer(size), items)
                for t, offset in items:
                    view = _view(chunk.host, offset, t)
                    view.copy_(t.data)
                    t.data = view  # the tensor's old storage goes with its last reference
                if pinning is not None:
                    pinning.pin(chunk.host)
                self.chunks.append(chunk)
        self.device_buffers: list[torch.Tensor] | None = None
        # The side stream's event marking this set's copy done, until the compute stream waited for it.
        self.event = None

    @property
    def resident(self) -> bool:
        return self.device_buffers is not None

    # Views made under inference mode would be inference tensors, unusable as parameters outside it.

    def bind(self, buffers: list[torch.Tensor]) -> None:
        with torch.inference_mode(False):
            for chunk, buffer in zip(self.chunks, buffers):
                for t, offset in chunk.items:
                    t.data = _view(buffer, offset, t)
        self.device_buffers = buffers

    def unbind(self) -> None:
        with torch.inference_mode(False):
            for chunk in self.chunks:
                for t, offset in chunk.items:
                    t.data = _view(chunk.host, offset, t)
        self.device_buffers = None

    def uses_device_copy(self) -> bool:
        """Whether every tensor now points into the device buffers (for tests and checks)."""
        if self.device_buffers is None:
            return False
        for chunk, buffer in zip(self.chunks, self.device_buffers):
            start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
            for t, _ in chunk.items:
                if t.numel() and not start <= t.data_ptr() < end:
                    return False
        return True

    def __repr__(self) -> str:
        return f"WeightSet({self.name!r}, {len(self.tensors)} tensors, {self.nbytes} bytes)"


# The event of a copy made synchronously (no side stream: a CPU device).
COPY_DONE = object()

# An observer of every move: (action, set name) with action "load", "wait" or "release".
Trace = Callable[[str, str], None]


class Transfers:
    """Loads and releases WeightSets on one device; on CUDA the copies run on a side stream."""

    def __init__(self, device: torch.device, trace: Trace | None = None):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.trace = trace

    def _note(self, action: str, ws: WeightSet) -> None:
        if self.trace is not None:
            self.trace(action, ws.name)

    def load(self, ws: WeightSet, wait: bool = False) -> None:
        """Start copying `ws` to the device (nothing if it is there); with `wait`, work issued on the
        compute stream from now on may read it."""
        if not ws.resident:
            self._note("load", ws)
            with torch.inference_mode(False), torch.no_grad():
                buffers = [torch.empty(c.host.numel(), dtype=torch.uint8, device=self.device) for c in ws.chunks]
                if self.stream is None:
                    for buffer, chunk in zip(buffers, ws.chunks):
                        buffer.copy_(chunk.host)
                    # Done already; kept so the waits happen (and can be checked) as on a GPU.
                    ws.event = COPY_DONE
                else:
                    self.stream.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(self.stream):
                        for buffer, chunk in zip(buffers, ws.chunks):
                            buffer.copy_(chunk.host, non_blocking=True)
                        ws.event = torch.cuda.Event()
                        ws.event.record(self.stream)
            ws.bind(buffers)
        if wait:
            self.wait(ws)

    def wait(self, ws: WeightSet) -> None:
        """The compute stream waits (on the device, not the host) for the set's copy."""
        if ws.event is not None:
            self._note("wait", ws)
            if ws.event is not COPY_DONE:
                torch.cuda.current_stream(self.device).wait_event(ws.event)
            ws.event = None

    def release(self, ws: WeightSet) -> None:
        """Point the set back at its host copies; its device memory goes back to the allocator."""
        if not ws.resident:
            return
        self.wait(ws)
        self._note("release", ws)
        ws.unbind()
