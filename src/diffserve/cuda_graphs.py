"""CUDA graphs for a denoiser's forward: its kernels recorded once per input signature, then replayed.

A compiled FLUX.1-dev forward launches ~1,600 kernels. With FP8 the GPU finishes them about as fast
as Python issues them, so the host, not the GPU, sets the pace (H200: 88 ms of host time for a 92 ms
forward). Replaying a recorded graph issues the whole forward in one call.

`CudaGraphedForward` wraps a module's forward. Inputs are told apart by their signature: every
tensor's shape, dtype, device and strides, and every other argument's value. The first call of a
signature runs normally (it compiles and warms up), the second records the graph and replays it, later
ones copy their tensors into the graph's inputs and replay. A forward that cannot be recorded (it
reads a GPU value on the host, say) runs normally from then on, with one warning.

Only what the graph recorded runs on replay: Python logic in the forward that depends on anything
but the signature (a step cache deciding to skip, offload hooks moving weights, LoRA adapters switched
per request) would be frozen, which is why the engine refuses those combinations (config.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)


def signature(args: tuple, kwargs: dict):
    """What a recorded graph is valid for: the structure of the arguments, each tensor's layout, and the
    value of everything that is not a tensor."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = tuple(
        ("tensor", tuple(x.shape), x.dtype, x.device, x.stride()) if isinstance(x, torch.Tensor) else ("value", x)
        for x in leaves
    )
    return str(spec), described


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the graph's static input tensors, in leaf order
    outputs: object  # the graph's static outputs (a pytree)


class CudaGraphedForward:
    """Replays `module`'s forward as CUDA graphs, one per input signature (at most `max_graphs`)."""

    def __init__(self, module: nn.Module, max_graphs: int = 16):
        self.forward = module.forward
        self.name = type(module).__name__
        self.max_graphs = max_graphs
        self.seen: set = set()
        self.graphs: dict = {}
        self.failed: set = set()
        self.pool = None

    def __call__(self, *args, **kwargs):
        try:
            key = signature(args, kwargs)
            recorded = self.graphs.get(key)
        except TypeError:  # an argument that cannot be told apart by value (unhashable): run it as it is
            return self.forward(*args, **kwargs)
        if recorded is None:
            if key not in self.seen or key in self.failed or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                return self.forward(*args, **kwargs)
            recorded = self._record(args, kwargs, key)
            if recorded is None:
                return self.forward(*args, **kwargs)
        leaves = pytree.tree_leaves((args, kwargs))
        for static, value in zip(recorded.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            static.copy_(value)
        recorded.graph.replay()
        # The next replay overwrites the graph's outputs: the caller gets its own copies.
        return pytree.tree_map_only(torch.Tensor, torch.clone, recorded.outputs)

    def _record(self, args, kwargs, key) -> _Recorded | None:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(static, spec)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.forward(*static_args, **static_kwargs)
        except Exception as error:  # noqa: BLE001 - any failure to record means: run this signature eagerly
            self.failed.add(key)
            logger.warning("%s: its forward cannot be recorded as a CUDA graph (%s); running it without",
                           self.name, str(error).splitlines()[0] if str(error) else type(error).__name__)
            torch.cuda.synchronize()
            return None
        if not all(isinstance(x, torch.Tensor) or x is None for x in pytree.tree_leaves(outputs)):
            self.failed.add(key)
            logger.warning("%s: its forward returns something other than tensors, which a replay cannot copy; "
                           "running it without a CUDA graph", self.name)
            return None
        recorded = _Recorded(graph, [x for x in static if isinstance(x, torch.Tensor)], outputs)
        self.graphs[key] = recorded
        logger.info("%s: recorded a CUDA graph for a new input signature (%d recorded)", self.name, len(self.graphs))
        return recorded


def use_cuda_graphs(module: nn.Module) -> CudaGraphedForward:
    """Make `module`'s calls replay CUDA graphs (its forward, wrapped on the instance)."""
    runner = CudaGraphedForward(module)
    module.forward = runner
    return runner
