"""Model-level offload: the pipeline's components take turns on the device.

The stages, in the order a request uses them: the encoders (together), each denoiser (Wan2.2's two
experts one at a time), the VAEs. A hook on each component's entry (`forward`; `encode`/`decode` for
VAEs; the direct submodules of encoders and VAEs, which pipelines may call themselves) makes its stage
the active one: the stage is loaded and every other stage is let go (at no cost: weights are read-only,
nothing is copied back), except the first denoiser's first sets (below). Tensor inputs on another device
are moved to the execution device, since a pipeline may read a component's device while the component
is on the host.

Weight budget: the weights on the device never exceed the largest stage's bytes, at any moment, so
offload's peak is the largest stage. Within it, copies overlap with compute where the next use is known:
- a denoiser is copied in call order, the rest of it first and then block by block, each with its
  own event: its first call starts once the first block is there, and each block waits for its own
  copy only, so the first step computes behind the copy of the blocks after the running one. The
  blocks then stay until the stage is let go: later calls copy nothing;
- while the encoders run, the first denoiser's copy starts: its rest and first blocks, as many as fit
  next to the encoders within the largest stage;
- when a VAE starts decoding, the denoisers are done and the next request starts with the encoders:
  they are copied during the decode, provided the encoders and VAEs together fit within the largest
  stage;
- the first denoiser's sets are copied first by the next request anyway, so when a stage other than a
  denoiser becomes active (a decode with the encoders it copies, the encoders, a VAE encoding an input
  image) the first denoiser keeps the longest prefix of its sets, in call order, that fits next to it
  within the largest stage, and lets only the rest go: the next request finds that prefix on the device
  and copies only the rest. A denoiser becoming active lets the others go whole (Wan2.2's experts are of
  one size: the second leaves no room for the first), so there the next encode copies it again.

With layerwise offload a denoiser's stage holds no weights of its own: its blocks stream through the
device (diffserve.offload.layerwise) and the rest of it stays there; encoders and VAEs still take turns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from diffserve.offload.hooks import ENTRY_METHODS, Hooks, move_to_device
from diffserve.offload.layerwise import BlockStreamer
from diffserve.offload.weights import Transfers, WeightSet


class Stage:
    """Components that are on the device together."""

    def __init__(
        self,
        name: str,
        kind: str,
        modules: list[nn.Module],
        sets: list[WeightSet],
        ready_sets: list[WeightSet] | None = None,
        streamer: BlockStreamer | None = None,
    ):
        self.name = name
        self.kind = kind  # "encoder", "dit" or "vae"
        self.modules = modules
        self.sets = sets  # copied when the stage becomes active, in this order
        # The compute stream waits for these when the stage becomes active; a denoiser's blocks are
        # waited for by the block's own hook, so the first step computes behind their copy.
        self.ready_sets = sets if ready_sets is None else ready_sets
        self.streamer = streamer

    @property
    def device_bytes(self) -> int:
        """What the stage puts on the device while it is active."""
        return sum(ws.nbytes for ws in self.sets) + (self.streamer.device_bytes if self.streamer else 0)

    def is_resident(self) -> bool:
        return any(ws.resident for ws in self.sets) or bool(self.streamer and self.streamer.resident_blocks())


class ComponentOffloader:
    def __init__(self, stages: list[Stage], transfers: Transfers, device: torch.device):
        self.stages = stages
        self.transfers = transfers
        self.device = device
        self.active: Stage | None = None

    def activate(self, stage: Stage, via: str = "forward") -> None:
        if self.active is stage:
            return
        kept = self._denoiser_prefix_to_keep(stage, via)
        first_dit = self._first_denoiser()
        for other in self.stages:
            if other is not stage:
                self.release(other, keep=kept if other is first_dit else 0)
        for ws in stage.sets:
            self.transfers.load(ws)
        for ws in stage.ready_sets:
            self.transfers.wait(ws)
        self.active = stage
        if stage.kind == "encoder":
            self.prefetch_denoiser()
        if via == "decode":
            self.prefetch_encoders()

    def stage_started(self, name: str) -> None:
        """The pipeline's stage `name` starts (its StageTimer says so). When the denoise stage starts,
        the encoders (and a VAE that encoded an input image) are done: they go now rather than at the
        first transformer call, so the denoise stage's memory holds only what denoising needs."""
        if name == "denoise" and self.active is not None and self.active.kind != "dit":
            self.release(self.active)
            self.active = None

    def release(self, stage: Stage, keep: int = 0) -> None:
        """Let the stage's sets go, all but the first `keep` (in call order)."""
        for ws in stage.sets[keep:]:
            self.transfers.release(ws)
        if stage.streamer is not None:
            stage.streamer.release_all()

    def _largest_stage_bytes(self) -> int:
        return max(s.device_bytes for s in self.stages)

    def _first_denoiser(self) -> Stage | None:
        """The model-level denoiser that runs first (a layerwise one holds no sets of its own)."""
        return next((s for s in self.stages if s.kind == "dit" and s.sets), None)

    def _encoders(self) -> Stage | None:
        return next((s for s in self.stages if s.kind == "encoder"), None)

    def _encoders_fit_next_to(self, vae: Stage) -> bool:
        """Whether the encoders are copied during `vae`'s decode: only when both fit within the largest stage."""
        encoders = self._encoders()
        return encoders is not None and encoders.device_bytes + vae.device_bytes <= self._largest_stage_bytes()

    def _denoiser_prefix_to_keep(self, stage: Stage, via: str) -> int:
        """How many of the first denoiser's sets (in call order) stay while `stage` runs: those on the
        device that fit next to it (and to the encoders a decode copies) within the largest stage. The
        next request copies this prefix first anyway (prefetch_denoiser): kept, it is never copied again.
        A denoiser becoming active keeps nothing of another (Wan2.2's experts are of one size)."""
        dit = self._first_denoiser()
        if dit is None or stage.kind == "dit":
            return 0
        room = self._largest_stage_bytes() - stage.device_bytes
        if via == "decode" and self._encoders_fit_next_to(stage):
            room -= self._encoders().device_bytes
        kept = 0
        for ws in dit.sets:
            if not ws.resident or ws.nbytes > room:
                break
            room -= ws.nbytes
            kept += 1
        return kept

    def prefetch_denoiser(self) -> None:
        """While the encoders run: the first denoiser's sets in call order, as many as fit next to them
        (those kept since the last request are there already)."""
        dit = self._first_denoiser()
        if dit is None:
            return
        room = self._largest_stage_bytes() - self.active.device_bytes
        for ws in dit.sets:
            if ws.nbytes > room:
                break
            room -= ws.nbytes
            self.transfers.load(ws)

    def prefetch_encoders(self) -> None:
        encoders = self._encoders()
        if encoders is None or encoders.is_resident() or not self._encoders_fit_next_to(self.active):
            return
        for ws in encoders.sets:
            self.transfers.load(ws)

    # -- hooks --------------------------------------------------------------------------------------

    def _enter(self, stage: Stage, via: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.activate(stage, via)
        if stage.streamer is not None and via == "forward":
            stage.streamer.begin_call()
        return move_to_device(args, self.device), move_to_device(kwargs, self.device)

    def install(self, hooks: Hooks, block_sets: dict[str, list[tuple[nn.Module, WeightSet]]]) -> None:
        """Entry hooks on every stage's modules. `block_sets[stage name]`: a model-level denoiser's
        (block, its weight set), whose hooks wait for the block's copy."""
        for stage in self.stages:
            for module in stage.modules:
                hooks.before_forward(module, self._forward_hook(stage))
                if stage.kind != "dit":
                    # Pipelines may call an encoder's or a VAE's parts directly (Qwen-Image runs its
                    # VL encoder's language model, `text_encoder.model`): those are entries too.
                    for child in module.children():
                        hooks.before_forward(child, self._forward_hook(stage))
                if stage.streamer is not None:
                    hooks.after_forward(module, lambda m, streamer=stage.streamer: streamer.end_call())
                for name in ENTRY_METHODS:
                    if callable(getattr(module, name, None)):
                        hooks.wrap_method(module, name, self._method_hook(stage, name))
            for block, ws in block_sets.get(stage.name, ()):
                hooks.before_forward(block, lambda m, args, kwargs, ws=ws: self.transfers.wait(ws))

    def _forward_hook(self, stage: Stage):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            return self._enter(stage, "forward", args, kwargs)

        return hook

    def _method_hook(self, stage: Stage, name: str):
        def before(args: tuple, kwargs: dict[str, Any]):
            return self._enter(stage, name, args, kwargs)

        return before
