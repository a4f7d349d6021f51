"""Step-level batching (batching="step"): requests join and leave a running batch between denoise steps.

The worker holds the running requests, each with its own latents, timesteps, step index, scheduler
copy, noise and prompt embeddings (diffserve.models.denoise.DenoiseState); every step runs all of
them in one transformer call with per-sample timesteps. This module decides, at each step boundary,
who runs:

- Running requests share a step key: the request-level batch key (diffserve.engine.admission) without
  the parameters each request keeps to itself (`PER_REQUEST_PARAMS`: its step count, guidance scales,
  skip-layer guidance, audio window), so requests with different step counts or scales share steps,
  while shapes, CFG on/off, text length and adapter set still match.
- Between steps, waiting requests with the running key join in arrival order while the batch stays
  within its caps: `max_batch_size` prompts, `step_max_batch_tokens` activation tokens
  (diffserve.engine.cost.activation_tokens) and `step_latency_target_ms` of predicted step time
  (StepTimes: measured per step key and batch size), and with `step_min_batch_gain` only while a
  bigger batch still cuts the measured step time per sample by that fraction (once the GPU is
  saturated, a bigger batch only makes everybody wait longer). Finished requests leave; requests
  whose callers left (`cancelled`) are dropped, their states freed.
- Begin (encode, prepare) and finish (decode) run on the worker inline or, with step_overlap_stages,
  on a background thread while the batch keeps stepping (diffserve.engine.stages): a started request
  is `beginning` until the worker reports it begun, and joins the steps at that boundary; a finished
  one is `finishing` until its output comes. The batch's key stays while requests of it are beginning
  (they are part of the batch), and parking waits for them to join.
- Fairness: a waiting request whose key differs waits at most `step_max_wait` steps of the running
  batch; then the batch stops admitting and drains, and the next batch starts with that request's key.
  Its wait is bounded by step_max_wait plus the longest remaining step count of the batch. With
  `step_preemption` the running requests are parked instead (their states stay in the worker) and
  the waiting one starts at once: its wait is bounded by step_max_wait steps. Parked requests count
  their waited steps like queued ones and resume, before newer requests of their key, when their key
  runs again.

The waiting requests live in a Scheduler queue: the batcher's own offline, the async engine's shared
one when serving (each data-parallel replica's runner drives its own StepBatcher over it, under the
engine's lock; diffserve.engine.step_runner).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from diffserve.engine.admission import batch_key
from diffserve.engine.cost import activation_tokens
from diffserve.engine.scheduler import ScheduledRequest
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

# Sampling parameters that change only a running request's own DenoiseState (its timesteps and
# starting latents, its CFG scale per step, its conditioning tensors, whether a step runs skip-layer
# guidance) or its decode (the audio window's crop), so they are not part of the step key. A step
# input that selects what the call does (SD3's skip-layer guidance, Wan2.2's expert) splits a step
# into one call per value (diffserve.models.denoise.denoise_step).
PER_REQUEST_PARAMS = frozenset({
    "num_inference_steps", "strength", "guidance_scale", "guidance_scale_2", "true_cfg_scale",
    "skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop",
    "audio_start_in_s", "audio_end_in_s",
})


def step_key(spec, req: OmniDiffusionRequest) -> tuple:
    """Requests with equal step keys may run their steps in one transformer call."""
    params, cfg, images = batch_key(spec, req)
    return tuple(p for p in params if p[0] not in PER_REQUEST_PARAMS), cfg, images


def families_with_step_batching() -> list[str]:
    """The native pipeline classes that run under batching="step" (imports every native pipeline)."""
    from diffserve.registry import _DIFFUSION_MODELS, get_pipeline_class

    return [name for name in _DIFFUSION_MODELS if getattr(get_pipeline_class(name), "supports_step_batching", False)]


def check_step_batching(engine) -> None:
    """A model that has not split its call into begin/finish is refused under batching="step"."""
    if not engine.executor.collective_rpc("supports_step_batching")[0]:
        raise ValueError(
            f"batching='step' is not supported by {engine.od_config.model_class_name}; it is by "
            f"{', '.join(families_with_step_batching())} (use batching='request' for this model)"
        )


@dataclass(eq=False)
class _Run:
    """A started request: its queue entry, its step count and the batch sizes it ran in."""

    entry: ScheduledRequest
    total_steps: int
    tokens: int  # activation tokens (the memory cap)
    occupancy: list[int] = field(default_factory=list)  # samples in each step it ran in
    preemptions: int = 0

    @property
    def request_id(self) -> str:
        return self.entry.req.request_id


@dataclass
class _Plan:
    """What one step boundary does on the worker, decided under the lock, done outside it."""

    drop: list[_Run] = field(default_factory=list)
    park: list[_Run] = field(default_factory=list)
    resume: list[_Run] = field(default_factory=list)
    start: list[ScheduledRequest] = field(default_factory=list)


@dataclass
class _Load:
    """The prospective batch at a boundary: what the caps are checked against."""

    prompts: int = 0
    samples: int = 0
    tokens: int = 0
    empty: bool = True

    def add(self, req: OmniDiffusionRequest, tokens: int) -> None:
        self.prompts += len(req.prompts)
        self.samples += req.batch_size
        self.tokens += tokens
        self.empty = False


class StepTimes:
    """Measured seconds of a step per (step key, samples), as moving averages. An unmeasured size is
    predicted from the nearest measured one: a larger size's time (a step does not get faster with
    more samples), else the largest smaller size's scaled linearly (batching costs at most linearly).

    The first measurement of a size is not kept: it pays for warm-up (with torch.compile the blocks
    recompile when the batch size first changes; eager kernels and the allocator's first blocks), up to
    seconds against milliseconds, and a cap that refused that size on it would never run it again to
    correct it. The second replaces it. An average not refreshed for `stale_after` steps (of any key)
    is replaced by the next measurement too, as conditions may have changed since."""

    def __init__(self, weight: float = 0.3, stale_after: int = 256):
        self.weight = weight  # of the newest measurement
        self.stale_after = stale_after
        self.seconds: dict[tuple, dict[int, float]] = {}
        self.warming: dict[tuple, set[int]] = {}  # sizes measured once: the warm-up measurement, dropped
        self.observed_at: dict[tuple, dict[int, int]] = {}  # the step count at each size's last measurement
        self.steps = 0

    def observe(self, key: tuple, samples: int, seconds: float) -> None:
        self.steps += 1
        sizes, warming = self.seconds.setdefault(key, {}), self.warming.setdefault(key, set())
        if samples not in sizes and samples not in warming:
            warming.add(samples)
            return
        warming.discard(samples)
        old = None if self.is_stale(key, samples) else sizes.get(samples)
        sizes[samples] = seconds if old is None else old + self.weight * (seconds - old)
        self.observed_at.setdefault(key, {})[samples] = self.steps

    def is_stale(self, key: tuple, samples: int) -> bool:
        """Measured longer than `stale_after` steps ago (False: never measured, or recently)."""
        at = self.observed_at.get(key, {}).get(samples)
        return at is not None and self.steps - at > self.stale_after

    def measured(self, key: tuple, samples: int) -> float | None:
        """The average at exactly this size; None: never measured past its warm-up."""
        return self.seconds.get(key, {}).get(samples)

    def buys_throughput(self, key: tuple, samples: int, grown: int, gain: float) -> bool:
        """Whether a batch of `samples` should grow to `grown` (step_min_batch_gain): the measured
        seconds per sample at `grown` are at least `gain` lower than at `samples`. A `grown` never
        measured, or stale, is explored (it runs, so it gets measured); but only from a measured
        `samples`, so the batch grows into unmeasured sizes one request at a time and each size is
        compared with the one below it (a burst admitted whole would be the uncapped batch this cap is
        there to avoid). No starvation: a batch refused for want of a measurement runs at `samples`, so
        it is measured within two steps, and an empty batch takes anyone."""
        now = self.measured(key, samples)
        if now is None:
            return False
        after = self.measured(key, grown)
        if after is None or self.is_stale(key, grown):
            return True
        return after / grown <= (1 - gain) * now / samples

    def predict(self, key: tuple, samples: int) -> float | None:
        """None: nothing measured for this key yet."""
        sizes = self.seconds.get(key)
        if not sizes:
            return None
        larger = [n for n in sizes if n >= samples]
        if larger:
            return sizes[min(larger)]
        largest = max(sizes)
        return sizes[largest] * samples / largest


class StepBatcher:
    """Drives one engine's worker step by step. `add` queues admitted requests (also between steps),
    `step` runs one step boundary and returns the requests finished (or dropped) by it.

    `queue`: where waiting requests are (default: a queue of its own); `lock`: held while the queue and
    its entries are read or changed (the async engine's condition); `may_take()`: whether requests may be
    taken from the queue now (the async engine: not while another replica idles, which takes them)."""

    def __init__(self, engine, queue=None, lock=None, may_take=None):
        config = engine.od_config
        self.engine = engine
        self.queue = queue if queue is not None else engine.make_scheduler()
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.may_take = may_take or (lambda: True)
        self.max_batch_size = config.max_batch_size
        self.max_tokens = config.step_max_batch_tokens
        target = config.step_latency_target_ms
        self.latency_target_s = None if target is None else target / 1000
        self.min_gain = config.step_min_batch_gain
        self.max_wait = config.step_max_wait
        self.preemption = config.step_preemption
        self.running: dict[str, _Run] = {}
        self.parked: dict[str, _Run] = {}
        self.beginning: dict[str, _Run] = {}  # started, being encoded (total_steps unknown yet)
        self.finishing: dict[str, _Run] = {}  # steps done, being decoded
        self.key: tuple | None = None  # the running batch's step key
        self.occupancy: list[int] = []  # samples per step, over all steps run
        self.preemptions = 0  # step boundaries where the running requests were parked
        self.step_times = StepTimes()
        engine.executor.collective_rpc("step_stages", config.step_overlap_stages)

    # Hooks for the async engine (diffserve.engine.step_runner); called on the runner's thread.
    def started(self, entry: ScheduledRequest) -> None:
        """`entry` left the queue to join the batch (called under the lock)."""

    def progressed(self, entry: ScheduledRequest, done: int, total: int) -> None:
        """`entry` finished its step `done` of `total`."""

    def stepped(self, samples: int, seconds: float) -> None:
        """A step of `samples` samples ran in `seconds`."""

    def add(self, req: OmniDiffusionRequest) -> ScheduledRequest:
        """Queue a request admitted by the engine (it joins at a step boundary)."""
        with self.lock:
            return self.queue.add(req)

    @property
    def busy(self) -> bool:
        """Requests are running, parked, being encoded or being decoded."""
        return bool(self.running or self.parked or self.beginning or self.finishing)

    def _runs(self) -> list[_Run]:
        """Every request the batcher holds (not the queue)."""
        return [*self.running.values(), *self.parked.values(), *self.beginning.values(), *self.finishing.values()]

    def _forget_all(self) -> list[_Run]:
        runs = self._runs()
        for held in (self.running, self.parked, self.beginning, self.finishing):
            held.clear()
        return runs

    @property
    def idle(self) -> bool:
        return not self.busy and not len(self.queue)

    def step(self) -> list[DiffusionOutput]:
        """Admit waiting requests, run one step of the running batch, retire the finished ones."""
        return [out for _, out in self.advance()]

    def advance(self) -> list[tuple[ScheduledRequest, DiffusionOutput]]:
        """step(), with the queue entry of each output."""
        with self.lock:
            plan = self._plan()
        answered = self._apply(plan)
        # With nothing to step, wait for a begin or a decode instead of spinning.
        answered += self._collect(wait=not self.running)
        if self.running:
            answered += self._run_step()
            answered += self._collect()  # inline, the finished requests' outputs are here already
        return answered

    def run_all(self) -> list[DiffusionOutput]:
        outputs = []
        while not self.idle:
            outputs += self.step()
        return outputs

    def stop_all(self) -> list[tuple[ScheduledRequest, DiffusionOutput]]:
        """Stop every running and parked request (shutdown); their outputs say so."""
        return [(run.entry, _stopped(run.entry.req)) for run in self._forget_all()]

    def fail_all(self, exc: Exception) -> list[tuple[ScheduledRequest, DiffusionOutput]]:
        """Every running and parked request fails with `exc` (their worker group died: states lost)."""
        return [(run.entry, self.engine.error_output(run.entry.req, exc)) for run in self._forget_all()]

    # -- deciding, under the lock -----------------------------------------------------------------

    def _plan(self) -> _Plan:
        plan = _Plan(drop=[run for run in self._runs() if run.entry.cancelled])
        for run in plan.drop:
            for held in (self.running, self.parked, self.beginning, self.finishing):
                held.pop(run.request_id, None)
        if (self.running or self.beginning) and self._overdue():
            if not self.preemption or self.beginning:
                return plan  # drain (the waiting request's key runs next), or park once the beginning joined
            plan.park = self._park_running()
        if not self.running and not self.beginning:
            self.key = self._next_key()
        self._fill(plan)
        return plan

    def _candidates(self) -> list[ScheduledRequest]:
        """Who may start or resume: parked requests first (they resume before newer ones), then the queue."""
        parked = [run.entry for run in self.parked.values()]
        if not self.may_take():
            return parked
        return parked + [e for e in self.queue.waiting() if not e.cancelled]

    def _overdue(self) -> bool:
        return any(e.key != self.key and e.waited_steps >= self.max_wait for e in self._candidates())

    def _next_key(self) -> tuple | None:
        """The key of the request that has waited longest for another key, else the first candidate's."""
        candidates = self._candidates()
        if not candidates:
            return None
        return max(candidates, key=lambda e: e.waited_steps).key  # max keeps the first of equals

    def _park_running(self) -> list[_Run]:
        parked = list(self.running.values())
        for run in parked:
            run.preemptions += 1
            run.entry.waited_steps = 0
            self.parked[run.request_id] = run
        self.running.clear()
        self.preemptions += 1
        return parked

    def _fill(self, plan: _Plan) -> None:
        """Resume parked requests with the running key, then take queued ones, while the caps allow."""
        load = _Load()
        for run in (*self.running.values(), *self.beginning.values()):
            load.add(run.entry.req, run.tokens)
        for run in [run for run in self.parked.values() if run.entry.key == self.key]:
            if not self._fits(load, run.entry.req, run.tokens):
                return  # arrival order within a key: nobody overtakes a request that does not fit
            self.running[run.request_id] = self.parked.pop(run.request_id)
            plan.resume.append(run)
            load.add(run.entry.req, run.tokens)
        if not self.may_take():
            return
        for entry in [e for e in self.queue.waiting() if e.key == self.key and not e.cancelled]:
            tokens = activation_tokens(self.engine.spec, entry.req)
            if not self._fits(load, entry.req, tokens):
                return
            self.queue.remove(entry)
            self.started(entry)
            plan.start.append(entry)
            load.add(entry.req, tokens)

    def _fits(self, load: _Load, req: OmniDiffusionRequest, tokens: int) -> bool:
        """Whether `req` may join the batch `load`: an empty batch takes anything (a request over a cap
        runs alone), else every cap holds with it."""
        if load.empty:
            return True
        if load.prompts + len(req.prompts) > self.max_batch_size:
            return False
        if self.max_tokens is not None and load.tokens + tokens > self.max_tokens:
            return False
        if self.latency_target_s is not None:
            predicted = self.step_times.predict(self.key, load.samples + req.batch_size)
            if predicted is not None and predicted > self.latency_target_s:
                return False
        grown = load.samples + req.batch_size
        if self.min_gain is not None and not self.step_times.buys_throughput(self.key, load.samples, grown,
                                                                             self.min_gain):
            return False
        return True

    # -- doing, on the worker ---------------------------------------------------------------------

    def _apply(self, plan: _Plan) -> list[tuple[ScheduledRequest, DiffusionOutput]]:
        rpc = self.engine.executor.collective_rpc
        answered = [(run.entry, _stopped(run.entry.req)) for run in plan.drop]
        for method, runs in (("step_drop", plan.drop), ("step_park", plan.park), ("step_resume", plan.resume)):
            if runs:
                rpc(method, [run.request_id for run in runs])
        for entry in plan.start:
            try:
                rpc("step_begin", entry.req.request_id, entry.req)
            except Exception as exc:
                answered.append((entry, self.engine.error_output(entry.req, exc)))
                continue
            tokens = activation_tokens(self.engine.spec, entry.req)
            self.beginning[entry.req.request_id] = _Run(entry, 0, tokens)
        return answered

    def _collect(self, wait: bool = False) -> list[tuple[ScheduledRequest, DiffusionOutput]]:
        """Begun requests join the running ones; decoded ones are answered, as are failed begins and
        decodes (that request only)."""
        if not self.beginning and not self.finishing:
            return []
        answered, rpc = [], self.engine.executor.collective_rpc
        for kind, request_id, value in rpc("step_collect", wait)[0]:
            if request_id not in self.beginning and request_id not in self.finishing:
                # Its caller left (or fail_all forgot it) while its job ran: a begun state is freed.
                rpc("step_drop", [request_id])
            elif kind == "begun":
                run = self.running[request_id] = self.beginning.pop(request_id)
                run.total_steps = value
            elif kind == "output":
                answered.append(self._retire(self.finishing.pop(request_id), value))
            else:
                run = self.beginning.pop(request_id, None) or self.finishing.pop(request_id)
                answered.append((run.entry, self.engine.error_output(run.entry.req, value)))
        return answered

    def _run_step(self) -> list[tuple[ScheduledRequest, DiffusionOutput]]:
        rpc = self.engine.executor.collective_rpc
        try:
            samples, seconds, finished = rpc("step_run")[0]
        except Exception as exc:  # the whole batch shared the failed call
            with contextlib.suppress(Exception):  # a dead worker group has nothing to reset
                rpc("step_reset")
            failed = [(run.entry, self.engine.error_output(run.entry.req, exc)) for run in self.running.values()]
            self.running.clear()
            return failed
        self.occupancy.append(samples)
        self.step_times.observe(self.key, samples, seconds)
        for run in self.running.values():
            run.occupancy.append(samples)
            self.progressed(run.entry, len(run.occupancy), run.total_steps)
        with self.lock:
            for entry in self._candidates():
                entry.waited_steps += entry.key != self.key
        self.stepped(samples, seconds)
        for request_id in finished:
            self.finishing[request_id] = self.running.pop(request_id)
        return []

    def _retire(self, run: _Run, output: DiffusionOutput) -> tuple[ScheduledRequest, DiffusionOutput]:
        request_id, req = run.request_id, run.entry.req
        output.request_id = request_id
        output.prompt = req.prompts[0].prompt if len(req.prompts) == 1 else None
        output.seed = req.prompts[0].seed if len(req.prompts) == 1 else None
        output.metrics["e2e_s"] = time.monotonic() - run.entry.enqueued_at
        output.metrics["step_batch_occupancy"] = run.occupancy
        output.metrics["mean_step_batch_occupancy"] = sum(run.occupancy) / len(run.occupancy)
        output.metrics["step_batch_preemptions"] = run.preemptions
        return run.entry, output


def _stopped(req: OmniDiffusionRequest) -> DiffusionOutput:
    """The output of a request dropped at a step boundary (its caller left, or the engine stops)."""
    return DiffusionOutput(request_id=req.request_id, error="the request was stopped", error_type="aborted")
