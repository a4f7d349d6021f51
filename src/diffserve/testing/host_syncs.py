"""Find host syncs without a GPU: `meta` tensors stand for the device.

A host sync makes the host wait until the device has drained its queue: reading a device value
(`.item()`, a tensor's truth value), an op whose output shape depends on device values (`nonzero`,
`masked_select`), a copy between host and device memory, or a linear-algebra call that checks its
result on the host. In a denoise loop each one idles the GPU while the host queues the next kernels.

`HostSyncRecorder` is a dispatch mode that records the ops of those kinds that touch a `meta` tensor
(run the code with its device tensors on `meta`); `torch.cuda.set_sync_debug_mode("error")` is the
same check on a real GPU (tests/gpu/test_denoise_loop.py). Host-only arithmetic (a 0-dim CPU tensor
used as a scalar operand of a device op) is not a sync here, as on CUDA.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that read device values on the host.
_READS = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero", "aten::masked_select",
    "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::_linalg_check_errors",
})
_COPIES = frozenset({"aten::_to_copy", "aten::copy_", "aten::_copy_from"})
META = torch.device("meta")


class HostSyncRecorder(TorchDispatchMode):
    """Within the mode, `self.syncs` lists each op (aten name) that would sync a GPU host."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if "meta" in devices and name in _READS:
            self.syncs.append(name)
        elif name in _COPIES and _crosses_to_or_from_meta(devices, kwargs.get("device")):
            self.syncs.append(name)
        return func(*args, **kwargs)


def _crosses_to_or_from_meta(devices: set[str], target) -> bool:
    if target is not None:
        devices = devices | {torch.device(target).type}
    return "meta" in devices and len(devices) > 1


def denoise_loop_syncs(pipeline, *reqs) -> list[str]:
    """The host syncs of a pipeline's denoise loop: `begin(req)` on the CPU (a loaded pipeline,
    `diffserve.testing.load_pipeline`; requests from `pipeline_request`), then the denoisers and the
    states' tensors on `meta` and every step under HostSyncRecorder. Several requests step together,
    as step-level batching runs them (their text inputs padded to one length). Covers what
    `denoise_step` runs: the transformer calls, CFG and the scheduler (not state the scheduler holds
    beyond its sigmas)."""
    import copy

    from diffserve.models.denoise import denoise_step
    from diffserve.models.interface import discover_components

    states = []
    for req in reqs:
        state = pipeline.begin(req).state
        state.scheduler = copy.deepcopy(state.scheduler)  # each request steps its own, as the worker does
        states.append(state)
    for denoiser in discover_components(pipeline)["dit"].values():
        denoiser.to(META)
    pipeline._execution_device = META
    # One meta tensor per CPU tensor (kept alive beside it): CFG batches the inputs both branches share.
    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def to_meta(value):
        if isinstance(value, torch.Tensor):
            return moved.setdefault(id(value), (value, value.to(META)))[1]
        if isinstance(value, dict):
            return {key: to_meta(v) for key, v in value.items()}
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(to_meta(v) for v in value)
        return value

    for state in states:
        state.latents, state.timesteps = to_meta(state.latents), to_meta(state.timesteps)
        state.positive, state.negative = to_meta(state.positive), to_meta(state.negative)
        # What a pipeline's per-step inputs captured (an image-to-video model's conditioning latents).
        for cell in getattr(state.step_inputs, "__closure__", None) or ():
            try:
                cell.cell_contents = to_meta(cell.cell_contents)
            except ValueError:  # a cell not yet bound
                pass
    with HostSyncRecorder() as recorder:
        while not states[0].done:
            denoise_step(pipeline, states)
    return recorder.syncs
