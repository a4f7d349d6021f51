"""CPU offload: run models whose weights do not all fit on the device.

Two backends, applied by the worker after loading (models know nothing of them):
- model-level (`enable_cpu_offload`): encoders, denoisers and VAEs take turns on the device
  (diffserve.offload.model_level);
- layerwise (`enable_layerwise_offload`): each denoiser's blocks stream through the device, a few at a
  time (diffserve.offload.layerwise), and encoders and VAEs take turns as with model-level offload.
  Asking for both is the same as layerwise alone.

Weights wait in pinned host memory (diffserve.offload.weights). What goes where comes from the
pipeline's component declaration (diffserve.offload.plan); diffserve.offload.budget estimates what
each mode keeps on the device.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from diffserve.memory import gib
from diffserve.offload.hooks import Hooks
from diffserve.offload.layerwise import BlockStreamer, resident_block_indices
from diffserve.offload.model_level import ComponentOffloader, Stage
from diffserve.offload.plan import BlockPlan, OffloadPlan, plan_offload
from diffserve.offload.weights import HostPinning, Trace, Transfers, WeightSet

if TYPE_CHECKING:
    from diffserve.config import OmniDiffusionConfig

logger = logging.getLogger(__name__)

__all__ = ["Offloader", "apply_offload", "offload_mode"]


def offload_mode(od_config: "OmniDiffusionConfig") -> str | None:
    """"layerwise", "model" or None."""
    if od_config.enable_layerwise_offload:
        return "layerwise"
    return "model" if od_config.enable_cpu_offload else None


def check_plan(pipeline: nn.Module, plan: OffloadPlan, mode: str) -> None:
    name = type(pipeline).__name__
    if not plan.denoisers:
        raise ValueError(f"{name} declares no denoiser modules (_dit_modules), so there is nothing to offload")
    if mode == "layerwise":
        for dit in plan.denoisers:
            if not dit.blocks:
                raise ValueError(
                    f"enable_layerwise_offload needs the block lists of {name}.{dit.path} "
                    f"({type(dit.module).__name__}): declare _repeated_blocks (the block class names) or "
                    "_layerwise_offload_blocks_attrs; enable_cpu_offload works without them"
                )


class Offloader:
    """The applied offload of one pipeline: its stages, hooks and host memory, removable."""

    def __init__(self, pipeline: nn.Module, mode: str, device: torch.device, prefetch: int = 1,
                 trace: Trace | None = None, resident_blocks: int = 0):
        plan = plan_offload(pipeline)
        check_plan(pipeline, plan, mode)
        self.pipeline = pipeline
        self.mode = mode
        self.device = device
        self.transfers = Transfers(device, trace)
        self.pinning = HostPinning() if device.type == "cuda" else None
        self.hooks = Hooks()
        self.sets: dict[str, WeightSet] = {}
        self._set_of_module: dict[int, WeightSet] = {}
        # Layerwise: per denoiser path, the blocks that stay on the device, and those streamed.
        self.resident_blocks: dict[str, list[BlockPlan]] = {}
        streamed: dict[str, list[BlockPlan]] = {}

        on_device = list(plan.resident)
        if mode == "layerwise":
            for dit in plan.denoisers:
                kept = set(resident_block_indices(len(dit.blocks), resident_blocks, dit.path))
                self.resident_blocks[dit.path] = [b for i, b in enumerate(dit.blocks) if i in kept]
                streamed[dit.path] = [b for i, b in enumerate(dit.blocks) if i not in kept]
                on_device += dit.rest + [t for b in self.resident_blocks[dit.path] for t in b.tensors]
        for t in on_device:
            t.data = t.data.to(device)

        stages = []
        encoder_sets = [self._weight_set(path, tensors, plan.encoder_modules[path])
                        for path, tensors in plan.encoders.items()]
        if encoder_sets:
            stages.append(Stage("encoders", "encoder", list(plan.encoder_modules.values()), encoder_sets))
        block_sets: dict[str, list] = {}
        for dit in plan.denoisers:
            if mode == "layerwise":
                blocks = [self._weight_set(b.name, b.tensors, b.module) for b in streamed[dit.path]]
                streamer = BlockStreamer(dit.path, blocks, self.transfers, prefetch)
                streamer.install_block_hooks(self.hooks, [b.module for b in streamed[dit.path]])
                stages.append(Stage(dit.path, "dit", [dit.module], [], streamer=streamer))
            else:
                blocks = [self._weight_set(b.name, b.tensors, b.module) for b in dit.blocks]
                rest = self._weight_set(dit.path, dit.rest, dit.module)
                # The rest of the denoiser and its first block before the first step; a step cache
                # reads the first block's weights before the block runs.
                stages.append(Stage(dit.path, "dit", [dit.module], [rest, *blocks], ready_sets=[rest, *blocks[:1]]))
                block_sets[dit.path] = [(b.module, ws) for b, ws in zip(dit.blocks, blocks)]
        vae_sets = [self._weight_set(path, tensors, plan.vae_modules[path]) for path, tensors in plan.vaes.items()]
        if vae_sets:
            stages.append(Stage("vae", "vae", list(plan.vae_modules.values()), vae_sets))
        self.components = ComponentOffloader(stages, self.transfers, device)
        self.components.install(self.hooks, block_sets)
        if callable(getattr(pipeline, "stage_timer", None)):
            self.hooks.wrap_method(pipeline, "stage_timer", after=self._watch_stages)
        # Weights now wait on the host: the pipeline computes on `device` whatever its first denoiser
        # parameter says (SupportsComponentDiscovery.device reads this).
        pipeline._execution_device = device
        logger.info("%s", self.describe())

    def _watch_stages(self, timer):
        timer.on_stage = self.components.stage_started
        return timer

    def _weight_set(self, name: str, tensors: list[torch.Tensor], module: nn.Module) -> WeightSet:
        ws = WeightSet(name, tensors, self.pinning)
        self.sets[name] = ws
        self._set_of_module[id(module)] = ws
        return ws

    @property
    def stages(self) -> list[Stage]:
        return self.components.stages

    @property
    def streamed_bytes_per_call(self) -> dict[str, int]:
        """Layerwise: per denoiser, the bytes of blocks copied to the device in each of its calls."""
        return {stage.name: sum(ws.nbytes for ws in stage.streamer.sets)
                for stage in self.stages if stage.streamer is not None}

    def is_resident(self, module: nn.Module) -> bool:
        """Whether the offloaded weights of `module` (a component or a block) are on the device now."""
        if any(b.module is module for blocks in self.resident_blocks.values() for b in blocks):
            return True  # a block layerwise_resident_blocks keeps on the device
        ws = self._set_of_module.get(id(module))
        if ws is None:
            raise KeyError(f"{type(module).__name__} is not a component or block this offloader moves")
        return ws.resident

    def describe(self) -> str:
        parts = [f"{stage.name} {gib(stage.device_bytes)}" for stage in self.stages]
        what = "layerwise (denoiser blocks streamed)" if self.mode == "layerwise" else "model-level"
        kept = {path: len(blocks) for path, blocks in self.resident_blocks.items() if blocks}
        if kept:
            what += ", kept on the device: " + ", ".join(f"{n} blocks of {path}" for path, n in kept.items())
        return f"CPU offload, {what}, on {self.device}: on the device while in use: {', '.join(parts)}"

    def remove(self) -> None:
        """Undo everything: hooks gone, every weight on the device again, host memory unpinned."""
        self.hooks.remove()
        with torch.inference_mode(False), torch.no_grad():
            for ws in self.sets.values():
                self.transfers.release(ws)
                for t in ws.tensors:
                    t.data = t.data.to(self.device, copy=True)
        if self.pinning is not None:
            self.pinning.unpin_all()
        self.sets, self._set_of_module = {}, {}
        self.pipeline._execution_device = None


def apply_offload(pipeline: nn.Module, od_config: "OmniDiffusionConfig", device: torch.device,
                  trace: Trace | None = None) -> Offloader | None:
    """Apply the offload `od_config` asks for (None if it asks for none)."""
    mode = offload_mode(od_config)
    if mode is None:
        return None
    if od_config.enable_cpu_offload and od_config.enable_layerwise_offload:
        logger.info("enable_cpu_offload with enable_layerwise_offload: layerwise offload already moves the "
                    "encoders and VAEs model-level")
    return Offloader(pipeline, mode, device, od_config.layerwise_prefetch, trace, od_config.layerwise_resident_blocks)
