"""TeaCache's forward-replacing hook on one transformer.

While the hooked transformer runs, each of its block lists (diffserve.cache.blocks) is swapped for a
`TeaCacheBlocks` wrapper. The first wrapper computes the first block's modulated input with the
function the transformer declares, and decides: run the blocks (storing what each list added to its
hidden states), or skip every block and add the stored residuals instead. Everything outside the
block lists (embeddings, final norm and projection) runs as usual.

State is per batch row: a row is one sample of one CFG branch, so when both branches run as one
batch each keeps its own previous input and accumulated distance. A step is skipped only if no row
has accumulated the threshold, and the decision is all-reduced over every rank: CFG-parallel ranks
(one branch each) then take the decision the single-process batched run takes, and ranks that share
collectives inside the blocks (TP, HSDP, sequence parallel) always take the same path.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from diffserve.cache.blocks import CachedBlockList
from diffserve.distributed.parallel_state import get_world_group

# (first block, *its positional args, **its keyword args) -> modulated input [B, ...]
ModulatedInputFn = Callable[..., torch.Tensor]


def relative_l1_distance(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Per batch row: mean |current - previous| / mean |previous|, in float32."""
    change = (current - previous).abs().flatten(1).float().mean(1)
    return change / previous.abs().flatten(1).float().mean(1)


def rescale(distance: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """The polynomial (highest power first) at `distance`, by Horner's rule, on the device."""
    result = torch.full_like(distance, coefficients[0])
    for c in coefficients[1:]:
        result = result * distance + c
    return result


class StepCounter:
    """The current request's denoise steps, shared by all denoisers of a pipeline (Wan2.2's experts
    take turns, one call per step), and the steps that reused the cache."""

    def __init__(self) -> None:
        self.reset(None, None)

    def reset(self, num_steps: int | None, scheduler: Any) -> None:
        self.next_step = 0
        self.num_steps = num_steps
        # Without an explicit step count the pipeline's default applies; its scheduler holds the
        # request's timesteps by the time the first transformer call happens.
        self._scheduler = scheduler
        self.cached_steps: list[int] = []

    def begin_step(self) -> int:
        if self.num_steps is None and getattr(self._scheduler, "timesteps", None) is not None:
            self.num_steps = len(self._scheduler.timesteps)
        step, self.next_step = self.next_step, self.next_step + 1
        if self.num_steps is not None and step >= self.num_steps:
            raise RuntimeError(
                f"TeaCache saw transformer call {step + 1} in a request of {self.num_steps} denoise steps: it "
                "needs one call per step (CFG branches batched or CFG-parallel), and refresh() before each request"
            )
        return step

    @property
    def last_step(self) -> int | None:
        return None if self.num_steps is None else self.num_steps - 1


class ResidualForecast:
    """What a block list added to its stream, predicted for a skipped step from the computed steps.

    Order 0 reuses the last computed residual (plain TeaCache). Order n is TaylorSeer's forecast (Liu et
    al. 2025, arXiv:2503.06923): a Taylor series in the step index whose derivatives are finite
    differences over the last n + 1 computed steps; it needs that many computed steps before it uses
    all n orders, and falls back to the lower ones until then.
    """

    def __init__(self, order: int):
        self.order = order
        self.derivatives: list[torch.Tensor] = []  # value, then 1st, 2nd, ... derivative per step
        self.step: int | None = None

    def update(self, step: int, residual: torch.Tensor) -> None:
        derivatives = [residual]
        if self.derivatives and self.derivatives[0].shape == residual.shape:
            gap = step - self.step
            for previous in self.derivatives[: self.order]:
                derivatives.append((derivatives[-1] - previous) / gap)
        self.derivatives, self.step = derivatives, step

    @property
    def shape(self) -> torch.Size:
        return self.derivatives[0].shape

    def predict(self, step: int) -> torch.Tensor:
        elapsed = step - self.step
        prediction = self.derivatives[0]
        for i, derivative in enumerate(self.derivatives[1:], start=1):
            prediction = prediction + derivative * (elapsed**i / math.factorial(i))
        return prediction


class TeaCacheBlocks(nn.Module):
    """Stands in for one block list during a hooked forward: runs it, or replays its residual."""

    def __init__(self, hook: "TeaCacheHook", index: int, block_list: CachedBlockList):
        super().__init__()
        # Plain attributes, not submodules: the module tree keeps the blocks where they are.
        object.__setattr__(self, "_hook", hook)
        object.__setattr__(self, "_blocks", block_list.blocks)
        self.index = index
        self.attr = block_list.attr
        self.io = block_list.io

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        hook = self._hook
        if self.index == 0:
            hook.decide(self._blocks[0], hidden_states, *args, **kwargs)
        encoder = args[0] if self.io.takes_encoder else None
        rest = args[1:] if self.io.takes_encoder else args
        if hook.skip:
            replayed = self._replay(hidden_states, encoder)
            if replayed is not None:
                return replayed
        h, e = self._run(hidden_states, encoder, rest, kwargs)
        hook.record_residuals(
            self.attr, h - hidden_states, e - encoder if self.io.returns_encoder and encoder is not None else None
        )
        return self._pack(h, e)

    def _run(self, h: torch.Tensor, e: torch.Tensor | None, rest: tuple, kwargs: dict):
        for block in self._blocks:
            out = block(h, e, *rest, **kwargs) if self.io.takes_encoder else block(h, *rest, **kwargs)
            if self.io.returns == ("hidden_states",):
                h = out
            elif self.io.returns == ("hidden_states", "encoder_hidden_states"):
                h, e = out
            else:
                e, h = out
        return h, e

    def _replay(self, h: torch.Tensor, e: torch.Tensor | None):
        forecast_h, forecast_e = self._hook.residuals.get(self.attr, (None, None))
        # A list that never ran in this request (or ran on other shapes) has no usable residual: it
        # runs instead.
        if forecast_h is None or forecast_h.shape != h.shape:
            return None
        step = self._hook.step
        if forecast_e is not None:
            if e is None or forecast_e.shape != e.shape:
                return None
            e = e + forecast_e.predict(step)
        return self._pack(h + forecast_h.predict(step), e)

    def _pack(self, h: torch.Tensor, e: torch.Tensor | None):
        if self.io.returns == ("hidden_states",):
            return h
        if self.io.returns == ("hidden_states", "encoder_hidden_states"):
            return h, e
        return e, h


class TeaCacheHook:
    """Replaces `transformer.forward` until `remove()`; `reset()` forgets everything cached."""

    def __init__(
        self,
        transformer: nn.Module,
        block_lists: list[CachedBlockList],
        modulated_input: ModulatedInputFn,
        coefficients: Sequence[float],
        rel_l1_thresh: float,
        warmup_steps: int,
        counter: StepCounter,
        max_continuous_cached_steps: int = -1,
        forecast_order: int = 0,
        tag: str = "",
    ):
        self.transformer = transformer
        self.modulated_input = modulated_input
        self.coefficients = tuple(coefficients)
        self.rel_l1_thresh = rel_l1_thresh
        self.warmup_steps = warmup_steps
        self.counter = counter
        self.max_continuous_cached_steps = max_continuous_cached_steps
        self.forecast_order = forecast_order
        self.tag = tag
        self.wrappers = {
            lst.attr: nn.ModuleList([TeaCacheBlocks(self, i, lst)]) for i, lst in enumerate(block_lists)
        }
        self._original_forward: Callable | None = None
        self.reset()

    def reset(self) -> None:
        self.previous_input: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None
        # Block list -> forecasts of what it adds to the hidden and the encoder stream.
        self.residuals: dict[str, tuple[ResidualForecast, ResidualForecast | None]] = {}
        self.step = 0
        self.skip = False
        self.continuous_cached_steps = 0

    def record_residuals(self, attr: str, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        """What block list `attr` added on this computed step, for the skipped steps to come."""
        forecast_h, forecast_e = self.residuals.get(attr, (None, None))
        forecast_h = forecast_h or ResidualForecast(self.forecast_order)
        forecast_h.update(self.step, hidden)
        if encoder is None:
            forecast_e = None
        else:
            forecast_e = forecast_e or ResidualForecast(self.forecast_order)
            forecast_e.update(self.step, encoder)
        self.residuals[attr] = (forecast_h, forecast_e)

    def install(self) -> None:
        self._had_instance_forward = "forward" in self.transformer.__dict__
        self._original_forward = self.transformer.forward
        self.transformer.forward = self.forward

    def remove(self) -> None:
        if self._original_forward is None:
            return
        if self._had_instance_forward:
            self.transformer.forward = self._original_forward
        else:
            del self.transformer.forward
        self._original_forward = None
        self.reset()

    def forward(self, *args: Any, **kwargs: Any):
        self.step = self.counter.begin_step()
        self.skip = False
        originals = {attr: getattr(self.transformer, attr) for attr in self.wrappers}
        try:
            for attr, wrapper in self.wrappers.items():
                setattr(self.transformer, attr, wrapper)
            return self._original_forward(*args, **kwargs)
        finally:
            for attr, blocks in originals.items():
                setattr(self.transformer, attr, blocks)

    def decide(self, first_block: nn.Module, *args: Any, **kwargs: Any) -> None:
        """Called by the first block list, with the first block's inputs: sets `skip` for this step."""
        if self.rel_l1_thresh <= 0:  # never skips, so needs no signal
            self.skip = False
            return
        modulated = self._modulated_input_of(first_block, *args, **kwargs)
        self.skip = not self._must_compute(modulated)
        if self.skip:
            self.counter.cached_steps.append(self.step)
            self.continuous_cached_steps += 1
        else:
            self.continuous_cached_steps = 0

    def _modulated_input_of(self, block: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (hasattr(block, "unshard") and hasattr(block, "reshard")):
            return self.modulated_input(block, *args, **kwargs)
        # HSDP (FSDP2) keeps a block's weights sharded outside the block's own forward: gather them
        # while the declared function reads the block's input layers.
        block.unshard()
        try:
            return self.modulated_input(block, *args, **kwargs)
        finally:
            block.reshard()

    def _must_compute(self, modulated: torch.Tensor) -> bool:
        previous, self.previous_input = self.previous_input, modulated
        always_runs = (
            self.step < self.warmup_steps
            or self.step == self.counter.last_step
            or self.continuous_cached_steps == self.max_continuous_cached_steps
        )
        if previous is None or previous.shape != modulated.shape or always_runs:
            self.accumulated = torch.zeros(modulated.shape[0], device=modulated.device, dtype=torch.float32)
            return True
        self.accumulated = self.accumulated + rescale(relative_l1_distance(previous, modulated), self.coefficients)
        # Written as "not below" so that a NaN distance (an all-zero previous input) computes.
        rows_due = (~(self.accumulated < self.rel_l1_thresh)).any().to(torch.float32)
        # Every rank of the world group runs this request (a data-parallel replica is a process group
        # of its own): summing over the world gives all ranks one decision.
        get_world_group().all_reduce(rows_due)
        # The one host sync of a step: whether it runs the transformer blocks.
        compute = rows_due.item() > 0
        if compute:
            self.accumulated.zero_()
        return compute
