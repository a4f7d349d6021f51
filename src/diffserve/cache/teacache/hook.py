"""TeaCache's forward-replacing hook on one transformer.

While the hooked transformer runs, each of its block lists (diffserve.cache.blocks) is swapped for a
`TeaCacheBlocks` wrapper. The first wrapper computes the first block's modulated input with the
function the transformer declares, and decides: run the blocks (storing what each list added to its
hidden states), or skip every block and add the stored residuals instead. Everything outside the
block lists (embeddings, final norm and projection) runs as usual. With `reuse_output` a skipped step
instead returns the transformer's output of its request's last computed step (see `TeaCacheMemory`):
when every request in the call skips, nothing after the first block's input runs.

State is per batch row: a row is one sample of one CFG branch, so when both branches run as one
batch each keeps its own previous input and accumulated distance. A step is skipped only if no row
has accumulated the threshold, and the decision is all-reduced over every rank: CFG-parallel ranks
(one branch each) then take the decision the single-process batched run takes, and ranks that share
collectives inside the blocks (TP, HSDP, sequence parallel) always take the same path.

With `fixed_schedule` the warm-up, the cap on consecutive skips and the last step alone decide, without
the signal: the hook decides before the transformer's forward, and a call in which every request
reuses its output runs nothing of the transformer.

Under step-level batching (diffserve.engine.step_batching) the batch holds several requests, each at
its own step: the backend gives each its own step counter and memory (`TeaCacheMemory`: previous
input, accumulated distance, stored residuals) and tells the hook which rows are whose (`RowGroup`).
Each request decides by itself, as it would alone; the blocks run on the sub-batch of the computing
requests' rows, and each skipping request adds its own stored residual to its rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from diffserve.cache.blocks import CachedBlockList, args_rows, pack_outputs, rows_of, run_blocks
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


class TeaCacheMemory:
    """What TeaCache keeps of one request on one transformer between its steps."""

    def __init__(self) -> None:
        self.previous_input: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None
        # Block list -> forecasts of what it adds to the hidden and the encoder stream.
        self.residuals: dict[str, tuple[ResidualForecast, ResidualForecast | None]] = {}
        self.continuous_cached_steps = 0
        # reuse="output": the transformer's output on the computed steps (this request's rows).
        self.output: ResidualForecast | None = None

    def record(self, attr: str, step: int, order: int, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        """What block list `attr` added on computed step `step`, for the skipped steps to come."""
        forecast_h, forecast_e = self.residuals.get(attr, (None, None))
        forecast_h = forecast_h or ResidualForecast(order)
        forecast_h.update(step, hidden)
        if encoder is None:
            forecast_e = None
        else:
            forecast_e = forecast_e or ResidualForecast(order)
            forecast_e.update(step, encoder)
        self.residuals[attr] = (forecast_h, forecast_e)

    def record_output(self, step: int, order: int, output: torch.Tensor) -> None:
        """The transformer's output on computed step `step`, for reuse="output".

        A reused block residual is added to a skipped step's own, less noisy input, and after a long
        run of skips what it no longer cancels stays in the image as noise (the demo model: 26 dB worst
        after 12 skipped steps of 20). The output (predicted noise or velocity) needs no such input: a
        skipped step moves the sample as the last computed step did (33 dB for the same 12; see
        docs/cache.md).
        """
        self.output = self.output or ResidualForecast(order)
        self.output.update(step, output)

    def has_output(self, rows: int) -> bool:
        """Whether an output of `rows` rows is stored."""
        return self.output is not None and bool(self.output.derivatives) and self.output.shape[0] == rows


@dataclass(eq=False)
class RowGroup:
    """The rows of the current transformer batch that belong to one request, with its step counter and
    memory; each group decides by itself whether its rows run the blocks."""

    counter: StepCounter
    memory: TeaCacheMemory
    rows: torch.Tensor | None = None  # None: every row (the request is the whole batch)
    step: int = 0
    skip: bool = False


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The batch of a transformer call, from its hidden states (keyword or first positional)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(
            "TeaCache fixed_schedule needs the transformer's hidden_states as its first argument or keyword"
        )
    return hidden.shape[0]


class _OutputReused(Exception):
    """Raised by the first block list when every request of the call returns its stored output: it
    ends the hooked forward before the blocks, the final norm and the projection."""


class TeaCacheBlocks(nn.Module):
    """Stands in for one block list during a hooked forward: runs it on the rows whose request
    computes this step, and replays the stored residual on the others."""

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
            if hook.all_reuse_output(hidden_states.shape[0]):
                raise _OutputReused(hidden_states.shape[0])
        encoder = args[0] if self.io.takes_encoder else None
        groups = hook.groups
        if len(groups) == 1:  # one request: no rows to pick
            return self._pack(*self._whole_batch(groups[0], hidden_states, encoder, args, kwargs))
        return self._pack(*self._per_request(groups, hidden_states, encoder, args, kwargs))

    def _whole_batch(self, group: RowGroup, h: torch.Tensor, e: torch.Tensor | None, args: tuple, kwargs: dict):
        if group.skip:
            replayed = self._replay(group, h, e)
            if replayed is not None:
                return replayed
        out_h, out_e = self._run(h, args, kwargs)
        self._record(group, None, h, e, out_h, out_e)
        return out_h, out_e

    def _per_request(self, groups: list[RowGroup], h: torch.Tensor, e: torch.Tensor | None, args: tuple,
                     kwargs: dict):
        """Several requests: the blocks run on the sub-batch of the computing requests' rows; each
        skipping request adds its own residual to its rows."""
        replays = {}
        for group in groups:
            if group.skip:
                replayed = self._replay(group, h.index_select(0, group.rows), rows_of(e, group.rows))
                if replayed is not None:
                    replays[group] = replayed
        computing = [g for g in groups if g not in replays]
        if len(computing) == len(groups):  # every row runs: in the batch's own order
            out_h, out_e = self._run(h, args, kwargs)
            for group in computing:
                self._record(group, group.rows, h, e, out_h, out_e)
            return out_h, out_e
        out_h = torch.empty_like(h)
        out_e = torch.empty_like(e) if self._returns_encoder(e) else e
        if computing:
            self._run_rows(computing, h, args, kwargs, out_h, out_e)
        for group, (replay_h, replay_e) in replays.items():
            out_h.index_copy_(0, group.rows, replay_h)
            if self._returns_encoder(e):
                out_e.index_copy_(0, group.rows, replay_e)
        return out_h, out_e

    def _run_rows(self, computing: list[RowGroup], h: torch.Tensor, args: tuple, kwargs: dict,
                  out_h: torch.Tensor, out_e: torch.Tensor | None) -> None:
        """Run the blocks on the computing groups' rows only; write them into `out_h`/`out_e`."""
        rows = torch.cat([g.rows for g in computing])
        sub_args, sub_kwargs = args_rows(args, kwargs, rows, h.shape[0])
        sub_h, sub_e = h.index_select(0, rows), (sub_args[0] if self.io.takes_encoder else None)
        run_h, run_e = self._run(sub_h, sub_args, sub_kwargs)
        start = 0
        for group in computing:
            local = torch.arange(start, start + len(group.rows), device=rows.device)
            self._record(group, local, sub_h, sub_e, run_h, run_e)
            start += len(group.rows)
        out_h.index_copy_(0, rows, run_h)
        if self._returns_encoder(sub_e):
            out_e.index_copy_(0, rows, run_e)

    def _returns_encoder(self, e: torch.Tensor | None) -> bool:
        return self.io.returns_encoder and e is not None

    def _record(self, group: RowGroup, rows: torch.Tensor | None, h_in, e_in, h_out, e_out) -> None:
        """Store what the blocks added to `group`'s rows (`rows` of the batch they ran on)."""
        hook = self._hook
        encoder = rows_of(e_out - e_in, rows) if self._returns_encoder(e_in) else None
        group.memory.record(self.attr, group.step, hook.forecast_order, rows_of(h_out - h_in, rows), encoder)

    def _run(self, h: torch.Tensor, args: tuple, kwargs: dict):
        return run_blocks(self._blocks, self.io, h, args, kwargs)

    def _replay(self, group: RowGroup, h: torch.Tensor, e: torch.Tensor | None):
        """`group`'s rows plus their forecast residual, or None when this list has none usable."""
        forecast_h, forecast_e = group.memory.residuals.get(self.attr, (None, None))
        # A list that never ran in this request (or ran on other shapes) has no usable residual: it
        # runs instead.
        if forecast_h is None or forecast_h.shape != h.shape:
            return None
        if forecast_e is not None:
            if e is None or forecast_e.shape != e.shape:
                return None
            e = e + forecast_e.predict(group.step)
        return h + forecast_h.predict(group.step), e

    def _pack(self, h: torch.Tensor, e: torch.Tensor | None):
        return pack_outputs(self.io, h, e)


class TeaCacheHook:
    """Replaces `transformer.forward` until `remove()`; `reset()` forgets everything cached.

    Alone, a request's counter is `counter` and its memory `memory`. Under step batching the backend
    sets `step_groups` (each running request's rows, counter and memory) before each step's call.
    """

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
        reuse_output: bool = False,
        compute_last_step: bool = True,
        fixed_schedule: bool = False,
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
        self.reuse_output = reuse_output
        self.compute_last_step = compute_last_step
        self.fixed_schedule = fixed_schedule
        self.tag = tag
        self.wrappers = {
            lst.attr: nn.ModuleList([TeaCacheBlocks(self, i, lst)]) for i, lst in enumerate(block_lists)
        }
        self._original_forward: Callable | None = None
        self.step_groups: list[RowGroup] | None = None
        self.groups: list[RowGroup] = []  # the current call's
        self.reset()

    def reset(self) -> None:
        """Forget the request run alone (the step-batched requests' memories are the backend's)."""
        self.memory = TeaCacheMemory()

    @property
    def previous_input(self) -> torch.Tensor | None:
        return self.memory.previous_input

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
        self.groups = self.step_groups or [RowGroup(self.counter, self.memory)]
        for group in self.groups:
            group.step = group.counter.begin_step()
            group.skip = False
        if self.fixed_schedule:
            batch = _batch_size(args, kwargs)
            self._decide_fixed(batch)
            if self.all_reuse_output(batch):
                return self._reused_output(batch)
        originals = {attr: getattr(self.transformer, attr) for attr in self.wrappers}
        try:
            for attr, wrapper in self.wrappers.items():
                setattr(self.transformer, attr, wrapper)
            output = self._original_forward(*args, **kwargs)
        except _OutputReused as reused:
            return self._reused_output(batch=reused.args[0])
        finally:
            for attr, blocks in originals.items():
                setattr(self.transformer, attr, blocks)
        return self._with_reused_output(output) if self.reuse_output else output

    # -- reuse="output" -------------------------------------------------------------------------------

    def _group_rows(self, group: RowGroup, batch: int) -> int:
        return batch if group.rows is None else len(group.rows)

    def all_reuse_output(self, batch: int) -> bool:
        """Whether every request of this call skips and has a stored output for its rows."""
        return self.reuse_output and all(g.skip and g.memory.has_output(self._group_rows(g, batch)) for g in self.groups)

    def _reused_output(self, batch: int) -> torch.Tensor:
        predictions = [g.memory.output.predict(g.step) for g in self.groups]
        if len(self.groups) == 1 and self.groups[0].rows is None:
            return predictions[0].clone()  # a copy: the pipeline may update it in place
        output = predictions[0].new_empty((batch, *predictions[0].shape[1:]))
        for group, prediction in zip(self.groups, predictions):
            output.index_copy_(0, group.rows, prediction)
        return output

    def _with_reused_output(self, output: Any) -> torch.Tensor:
        """After a call in which some request computed: store the computing requests' output rows, and
        give the skipping ones (whose rows ran or replayed residuals) their stored output instead."""
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"TeaCache reuse='output' needs a transformer that returns one tensor; "
                f"{type(self.transformer).__name__} returned a {type(output).__name__} (use reuse='residual')"
            )
        batch = output.shape[0]
        for group in self.groups:
            if not group.skip:
                # A copy: the pipeline may update its output in place.
                group.memory.record_output(group.step, self.forecast_order, rows_of(output, group.rows).clone())
                continue
            if not group.memory.has_output(self._group_rows(group, batch)):
                continue  # nothing stored for these rows: they keep what the blocks gave
            prediction = group.memory.output.predict(group.step)
            if group.rows is None:
                output = prediction.clone()
            else:
                output = output.index_copy(0, group.rows, prediction)
        return output

    def decide(self, first_block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Called by the first block list, with the first block's inputs: sets each group's `skip`."""
        self._check_rows(hidden_states.shape[0])
        if self.rel_l1_thresh <= 0 or self.fixed_schedule:  # never skips, or decided before the forward
            return
        modulated = self._modulated_input_of(first_block, hidden_states, *args, **kwargs)
        inputs = [modulated if g.rows is None else modulated.index_select(0, g.rows) for g in self.groups]
        for group, compute in zip(self.groups, self._must_compute(inputs)):
            self._mark(group, skip=not compute)

    def _decide_fixed(self, batch: int) -> None:
        """fixed_schedule: each group skips unless its step must run or it has no output of its rows
        stored (a request's first step, or CFG truncation halving its batch)."""
        self._check_rows(batch)
        for group in self.groups:
            stored = group.memory.has_output(self._group_rows(group, batch))
            self._mark(group, skip=stored and not self._must_run(group))

    def _mark(self, group: RowGroup, skip: bool) -> None:
        group.skip = skip
        if skip:
            group.counter.cached_steps.append(group.step)
            group.memory.continuous_cached_steps += 1
        else:
            group.memory.continuous_cached_steps = 0

    def _must_run(self, group: RowGroup) -> bool:
        """Whether `group`'s step runs whatever the signal says: warm-up, the last step, or the cap."""
        return (
            group.step < self.warmup_steps
            or (self.compute_last_step and group.step == group.counter.last_step)
            or group.memory.continuous_cached_steps == self.max_continuous_cached_steps
        )

    def _check_rows(self, batch: int) -> None:
        expected = sum(len(g.rows) for g in self.groups if g.rows is not None)
        if self.step_groups is not None and batch != expected:
            raise RuntimeError(
                f"TeaCache expected the {expected} rows of the running requests in one transformer call, got "
                f"{batch}: under batching='step' both CFG branches of every request must run in one call"
            )

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

    def _must_compute(self, inputs: list[torch.Tensor]) -> list[bool]:
        """Per group (with its rows' modulated input): whether its rows run the blocks this step."""
        compute = [True] * len(self.groups)
        due: dict[int, torch.Tensor] = {}  # group index -> whether any of its rows reached the threshold
        for i, (group, modulated) in enumerate(zip(self.groups, inputs)):
            memory = group.memory
            previous, memory.previous_input = memory.previous_input, modulated
            if previous is None or previous.shape != modulated.shape or self._must_run(group):
                memory.accumulated = torch.zeros(modulated.shape[0], device=modulated.device, dtype=torch.float32)
                continue
            memory.accumulated = memory.accumulated + rescale(relative_l1_distance(previous, modulated),
                                                              self.coefficients)
            # Written as "not below" so that a NaN distance (an all-zero previous input) computes.
            due[i] = (~(memory.accumulated < self.rel_l1_thresh)).any()
        if not due:
            return compute
        rows_due = torch.stack(list(due.values())).to(torch.float32)
        # Every rank of the world group runs this request (a data-parallel replica is a process group
        # of its own): summing over the world gives all ranks one decision.
        get_world_group().all_reduce(rows_due)
        # The one host sync of a step: which requests run the transformer blocks.
        for i, flag in zip(due, rows_due.tolist()):
            compute[i] = flag > 0
            if compute[i]:
                self.groups[i].memory.accumulated.zero_()
        return compute
