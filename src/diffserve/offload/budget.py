"""Will the weights fit? An estimate, per offload mode, of the weight bytes on the device, checked at
start against `max_gpu_memory` (or, on CUDA without it, the device's total memory).

Estimated from the parameter and buffer bytes of each component as this rank builds them (a TP rank
its shard; HSDP divides the denoisers over its shard group; with `quantization` the denoisers' linear
weights count at their quantized size), before they are loaded:
- no offload: everything;
- model-level: the resident part plus the largest stage (the encoders together, one denoiser, the VAEs);
- layerwise: the resident part, the denoisers without their blocks, the blocks kept on the device
  (`layerwise_resident_blocks`), and the largest of: the encoders, the VAEs, prefetch + 1 of the
  largest streamed block.
Activations come on top and depend on the request; the check is about whether the model can load and
run at all, and says which mode would fit when the chosen one does not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from diffserve.layers.quantization import quantized_weight_bytes
from diffserve.memory import GIB, gib
from diffserve.models.interface import discover_components
from diffserve.offload.layerwise import resident_block_indices
from diffserve.offload.plan import OffloadPlan, Size, plan_offload, total_bytes
from diffserve.offload.weights import tensor_bytes

if TYPE_CHECKING:
    from diffserve.config import OmniDiffusionConfig

logger = logging.getLogger(__name__)

# mode -> how a user asks for it
MODE_FLAGS = {
    None: "no offload",
    "model": "enable_cpu_offload=True (--enable-cpu-offload)",
    "layerwise": "enable_layerwise_offload=True (--enable-layerwise-offload)",
}


def _layerwise_split(plan: OffloadPlan, resident_blocks: int) -> tuple[int, int]:
    """(bytes of the blocks kept on the device, bytes of the largest streamed block) over the denoisers."""
    kept_bytes, largest = 0, 0
    for d in plan.denoisers:
        kept = set(resident_block_indices(len(d.blocks), resident_blocks, d.path))
        sizes = [total_bytes(b.tensors, d.size) for b in d.blocks]
        kept_bytes += sum(n for i, n in enumerate(sizes) if i in kept)
        largest = max([largest] + [n for i, n in enumerate(sizes) if i not in kept])
    return kept_bytes, largest


def estimate_device_bytes(plan: OffloadPlan, mode: str | None, prefetch: int = 1, dit_shards: int = 1,
                          resident_blocks: int = 0) -> int:
    """Weight bytes on the device at the busiest moment of a request under `mode`."""
    dits = [d.nbytes // dit_shards for d in plan.denoisers]
    if mode is None:
        return plan.resident_bytes + plan.encoder_bytes + plan.vae_bytes + sum(dits)
    if mode == "model":
        return plan.resident_bytes + max([plan.encoder_bytes, plan.vae_bytes, *dits])
    if mode == "layerwise":
        rests = sum(d.rest_bytes // dit_shards for d in plan.denoisers)
        kept, largest = _layerwise_split(plan, resident_blocks)
        # Streamed blocks are let go when the VAE starts, and fetched again only by the next denoise loop.
        return (plan.resident_bytes + rests + kept // dit_shards
                + max(plan.encoder_bytes, plan.vae_bytes, (prefetch + 1) * (largest // dit_shards)))
    raise ValueError(f"unknown offload mode {mode!r}; allowed: None, 'model', 'layerwise'")


def device_budget(od_config: "OmniDiffusionConfig", device: torch.device) -> int | None:
    """max_gpu_memory in bytes; without it the CUDA device's total memory; None (no check) on the CPU."""
    if od_config.max_gpu_memory is not None:
        return int(od_config.max_gpu_memory * GIB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def weight_sizes(pipeline: nn.Module, quantization: str | None, keeps_unquantized: bool = False) -> Size:
    """Each tensor's bytes once loaded: quantization shrinks the denoisers' linear weights after loading
    (and `keeps_unquantized`, for unquantized_steps, adds the original weights back)."""
    if quantization is None:
        return tensor_bytes
    quantized: dict[int, int] = {}
    for module in discover_components(pipeline)["dit"].values():
        quantized.update(quantized_weight_bytes(module, quantization, keeps_unquantized))
    return lambda t: quantized.get(id(t), tensor_bytes(t))


def check_fits(pipeline: nn.Module, od_config: "OmniDiffusionConfig", device: torch.device) -> dict:
    """Raise ValueError naming the modes that would fit when the configured one does not; return the
    estimates {mode: bytes} otherwise."""
    from diffserve.offload import offload_mode

    pc = od_config.parallel_config
    plan = plan_offload(pipeline, weight_sizes(pipeline, od_config.quantization, od_config.unquantized_steps > 0))
    shards = pc.resolved_hsdp_shard_size if pc.use_hsdp else 1
    prefetch = od_config.layerwise_prefetch
    if not plan.denoisers or not all(d.blocks for d in plan.denoisers):
        modes = [m for m in MODE_FLAGS if m != "layerwise"]  # no block lists to stream
    else:
        modes = list(MODE_FLAGS)
    resident = od_config.layerwise_resident_blocks
    estimates = {mode: estimate_device_bytes(plan, mode, prefetch, shards, resident) for mode in modes}
    mode = offload_mode(od_config)
    budget = device_budget(od_config, device)
    needed = estimates.get(mode, estimates[None])
    where = f"{device}" + (f" (max_gpu_memory {gib(budget)})" if od_config.max_gpu_memory is not None else "")
    if budget is None or needed <= budget:
        logger.info("weights on %s with %s: about %s%s", device, MODE_FLAGS[mode], gib(needed),
                    f" of {gib(budget)}" if budget is not None else "")
        return estimates
    fitting = [f"{MODE_FLAGS[m]}: {gib(b)}" for m, b in estimates.items() if b <= budget and m != mode]
    advice = (
        f"modes that would fit: {'; '.join(fitting)}"
        if fitting
        else f"no offload mode fits (the smallest needs {gib(min(estimates.values()))}); use more GPUs "
             "(tensor parallel or HSDP shard the denoisers) or a larger device"
    )
    raise ValueError(
        f"{type(pipeline).__name__}'s weights need about {gib(needed)} on {where} with {MODE_FLAGS[mode]}, "
        f"more than {gib(budget)} (weights only; activations come on top); {advice}"
    )
