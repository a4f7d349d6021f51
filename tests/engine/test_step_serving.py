"""The async engine (the server's) under batching="step": requests that arrive while others run join at
the next step boundary and are answered as soon as they finish, with the request path's guarantees
(cancellation, deadlines, per-request progress), the caps, preemption and the metrics. Tiny demo
model, fp32 on a CPU; arrivals are made at exact step boundaries from progress callbacks (which run
on the replica's runner thread before the next boundary), so nothing depends on timing."""

import asyncio
import concurrent.futures
import contextlib
import time

import pytest

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.engine.cost import activation_tokens
from diffserve.engine.engine import DiffusionEngine
from diffserve.engine.step_batching import StepTimes, step_key
from diffserve.server.jobs import VideoJobStore
from diffserve.server.state import ServerConfig, ServerState
from tests.engine.test_step_batching import TOLERANCE, _request


@contextlib.contextmanager
def serving(path, **config):
    engine = DiffusionEngine(OmniDiffusionConfig.from_kwargs(
        path, dtype="float32", device="cpu", batching="step", disable_progress_bar=True, **config))
    server = AsyncDiffusionEngine(engine, max_queue=None, batch_wait_ms=0, step_timeout_s=None)
    try:
        yield engine, server
    finally:
        server.shutdown()


def on_loop(loop, fn):
    """Run `fn` on the event loop from a runner thread and wait for it (an arrival at this boundary)."""
    done = concurrent.futures.Future()

    def call():
        try:
            done.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            done.set_exception(exc)

    loop.call_soon_threadsafe(call)
    return done.result()


def until(condition):
    """Wait (on the runner thread, inside a progress callback) for another thread's doing."""
    while not condition():
        time.sleep(0.001)


@pytest.fixture(scope="module")
def demo_path(tiny_checkpoint):
    return tiny_checkpoint("demo-dit")


class Arrivals:
    """Requests started on the event loop, by name, and the order in which they were answered."""

    def __init__(self, server, loop):
        self.server, self.loop = server, loop
        self.tasks, self.submissions, self.answered, self.progress = {}, {}, [], {}

    def start(self, name, req, on_step=None, **limits):
        """Submit `req` now (on the loop); `on_step(done, total)` runs after each of its steps."""
        self.progress[name] = []

        def progress(done, total):
            self.progress[name].append((done, total))
            if on_step is not None:
                on_step(done, total)

        submission = self.submissions[name] = self.server.submit(req, progress, **limits)
        task = self.tasks[name] = self.loop.create_task(submission.wait())
        task.add_done_callback(lambda _: self.answered.append(name))
        return task

    def cancelled(self, name):
        return self.submissions[name].entry.cancelled

    async def results(self):
        return {name: await task for name, task in self.tasks.items()}


def test_a_request_joins_at_the_next_boundary_and_is_answered_when_it_finishes(demo_path):
    """b arrives after a's first step, joins at once (same step key, other step count and scale) and is
    answered while a keeps stepping. Both equal their runs alone; progress is each request's own."""
    with serving(demo_path, max_batch_size=4) as (engine, server):
        a = _request(engine, "a red circle", 1, steps=4, guidance_scale=3.0)
        b = _request(engine, "a blue square", 2, steps=2, guidance_scale=5.0)
        alone = {req.request_id: engine.run_batch([req])[0].images for req in (a, b)}

        async def scenario():
            arrivals = Arrivals(server, asyncio.get_running_loop())

            def a_step(done, total):
                if done == 1:
                    on_loop(arrivals.loop, lambda: arrivals.start("b", b))

            arrivals.start("a", a, a_step)
            await arrivals.tasks["a"]
            return arrivals, await arrivals.results()

        arrivals, out = asyncio.run(scenario())
    assert arrivals.answered == ["b", "a"]
    assert arrivals.progress == {"a": [(1, 4), (2, 4), (3, 4), (4, 4)], "b": [(1, 2), (2, 2)]}
    assert out["a"].metrics["step_batch_occupancy"] == [1, 2, 2, 1]
    assert out["b"].metrics["step_batch_occupancy"] == [2, 2]
    for req, name in ((a, "a"), (b, "b")):
        assert out[name].error is None and out[name].metrics["replica"] == 0
        assert (out[name].images - alone[req.request_id]).abs().max().item() <= TOLERANCE


def test_callers_that_leave_and_deadlines_end_only_their_requests(demo_path):
    """After a's first step three requests arrive: `gone` (its caller leaves after step 2), `late` (its run
    deadline has passed: the watchdog marks it) and `other` (another step key, its queue deadline
    passes while it waits). Each leaves at the next step boundary, its state freed; a runs on, exact."""
    with serving(demo_path, max_batch_size=4) as (engine, server):
        worker = engine.executor.worker
        a, gone, late = (_request(engine, "a red circle", i, steps=5, guidance_scale=1.0) for i in (1, 2, 3))
        other = _request(engine, "a blue square", 4, steps=2, guidance_scale=3.0)  # CFG on: another step key
        alone = engine.run_batch([a])[0].images
        held = []  # the worker's running requests during a's fourth step

        async def scenario():
            arrivals = Arrivals(server, asyncio.get_running_loop())
            loop = arrivals.loop

            def gone_step(done, total):  # its caller leaves after its first step
                on_loop(loop, arrivals.tasks["gone"].cancel)
                until(lambda: arrivals.cancelled("gone"))

            def a_step(done, total):
                if done == 1:
                    on_loop(loop, lambda: (arrivals.start("gone", gone, gone_step),
                                           arrivals.start("late", late, run_timeout_s=0),
                                           arrivals.start("other", other, queue_timeout_s=0)))
                elif done == 3:  # the watchdog sees `late` running (since the last boundary), overdue
                    until(lambda: arrivals.cancelled("late") and arrivals.tasks["other"].done())
                elif done == 4:
                    held.extend(worker._running)

            await arrivals.start("a", a, a_step)
            results = await asyncio.gather(*arrivals.tasks.values(), return_exceptions=True)
            return arrivals, dict(zip(arrivals.tasks, results))

        arrivals, out = asyncio.run(scenario())
    assert isinstance(out["gone"], asyncio.CancelledError)
    assert arrivals.progress["gone"] == [(1, 5)]
    assert out["late"].error_type == "timeout" and "ran longer than 0 s" in out["late"].error
    assert out["other"].error_type == "timeout" and "in the queue" in out["other"].error
    assert arrivals.progress["other"] == []
    assert held == [a.request_id] and not worker._running and not worker._parked
    assert arrivals.progress["late"] == [(1, 5)]  # its second step's report came after the watchdog
    assert out["a"].metrics["step_batch_occupancy"] == [1, 3, 2, 1, 1]
    assert (out["a"].images - alone).abs().max().item() <= TOLERANCE


def test_preemption_starts_a_request_of_another_key_within_step_max_wait_steps(demo_path):
    """With step_preemption, a request of another step key that waited step_max_wait=2 steps starts at
    the next boundary: the running one is parked (its state kept) and resumes after it, exact."""
    with serving(demo_path, max_batch_size=4, step_max_wait=2, step_preemption=True) as (engine, server):
        a = _request(engine, "a red circle", 1, steps=5, guidance_scale=1.0)
        o = _request(engine, "a blue square", 2, steps=2, guidance_scale=3.0)  # CFG on: another step key
        alone = {name: engine.run_batch([req])[0].images for name, req in (("a", a), ("o", o))}
        steps = []  # (request, its step) in the order they ran

        async def scenario():
            arrivals = Arrivals(server, asyncio.get_running_loop())

            def a_step(done, total):
                steps.append(("a", done))
                if done == 1:
                    on_loop(arrivals.loop, lambda: arrivals.start("o", o, lambda d, t: steps.append(("o", d))))

            arrivals.start("a", a, a_step)
            await arrivals.tasks["a"]
            return await arrivals.results()

        out = asyncio.run(scenario())
        preemptions = server.replicas[0].preemptions
    assert steps == [("a", 1), ("a", 2), ("o", 1), ("o", 2), ("a", 3), ("a", 4), ("a", 5)]
    assert preemptions == 1 and out["a"].metrics["step_batch_preemptions"] == 1
    assert out["a"].metrics["step_batch_occupancy"] == [1] * 5
    for name in ("a", "o"):
        assert (out[name].images - alone[name]).abs().max().item() <= TOLERANCE


def test_the_token_cap_bounds_the_batch_and_the_steps_reach_the_server_metrics(demo_path, tmp_path):
    with serving(demo_path, max_batch_size=4, step_max_batch_tokens=512) as (engine, server):
        state = ServerState(server, ServerConfig(), VideoJobStore(str(tmp_path)))
        requests = [_request(engine, "a red circle", i, steps=2, guidance_scale=1.0) for i in range(3)]
        assert activation_tokens(engine.spec, requests[0]) == 256  # 64x64 pixels, 4x4 per token: two fit
        outputs = server.run_all(requests)
        state.metrics.observe_state(state)
        metrics = state.metrics.render().decode()
    assert [out.metrics["step_batch_occupancy"] for out in outputs] == [[2, 2], [2, 2], [1, 1]]
    assert 'diffserve_step_batch_samples_count{replica="0"} 4.0' in metrics
    assert 'diffserve_step_batch_samples_sum{replica="0"} 6.0' in metrics
    assert 'diffserve_replica_requests_total{outcome="ok",replica="0"} 3.0' in metrics
    assert 'diffserve_replica_step_preemptions{replica="0"} 0.0' in metrics


def test_the_latency_target_admits_by_the_measured_step_time(demo_path):
    """Step times are given (not measured) so the decision is exact: 60 ms for one sample predicts
    120 ms for two, over the 100 ms target; 40 ms predicts 80 ms, within it."""
    engine = DiffusionEngine(OmniDiffusionConfig.from_kwargs(
        demo_path, dtype="float32", device="cpu", batching="step", step_latency_target_ms=100,
        disable_progress_bar=True))
    try:
        for one_sample_s, occupancy in ((0.06, [1, 1, 1, 1]), (0.04, [2, 2])):
            batcher = engine.step_batcher()
            requests = [_request(engine, "a red circle", i, steps=2, guidance_scale=1.0) for i in (1, 2)]
            batcher.step_times.seconds[step_key(engine.spec, requests[0])] = {1: one_sample_s}
            batcher.step_times.observe = lambda *args: None
            for req in requests:
                batcher.add(req)
            batcher.run_all()
            assert batcher.occupancy == occupancy
    finally:
        engine.shutdown()


def test_step_times_predict_unmeasured_sizes_from_measured_ones():
    times = StepTimes(weight=0.5)
    assert times.predict("k", 1) is None
    times.observe("k", 2, 5.0)  # a size's first step (warm-up): dropped
    assert times.predict("k", 2) is None
    times.observe("k", 2, 0.2)
    times.observe("k", 2, 0.4)  # moving average: 0.3
    times.observe("k", 8, 3.0)
    times.observe("k", 8, 0.9)
    assert times.predict("k", 2) == pytest.approx(0.3)
    assert times.predict("k", 1) == pytest.approx(0.3)  # the next larger size's
    assert times.predict("k", 4) == pytest.approx(0.9)
    assert times.predict("k", 16) == pytest.approx(1.8)  # the largest, scaled linearly


def test_data_parallel_replicas_each_run_their_own_step_batch(demo_path):
    """Four requests, batches of two: one replica takes two, and the other two go to the idle replica
    (a busy replica takes nothing while another idles), each stepping its own batch."""
    def build():
        return DiffusionEngine(OmniDiffusionConfig.from_kwargs(
            demo_path, dtype="float32", device="cpu", batching="step", max_batch_size=2, disable_progress_bar=True))

    engines = [build(), build()]
    server = AsyncDiffusionEngine(engines, max_queue=None, batch_wait_ms=0, step_timeout_s=None)
    try:
        requests = [_request(engines[0], "a red circle", i, steps=2, guidance_scale=1.0) for i in range(4)]
        until(lambda: all(replica.idle_since is not None for replica in server.replicas))  # both wait for work
        outputs = server.run_all(requests)
    finally:
        server.shutdown()
    replicas = [out.metrics["replica"] for out in outputs]
    assert replicas[0] == replicas[1] != replicas[2] == replicas[3]
    assert [out.metrics["step_batch_occupancy"] for out in outputs] == [[2, 2]] * 4


def test_a_failed_step_fails_its_requests_and_the_replica_serves_on(demo_path, monkeypatch):
    with serving(demo_path, max_batch_size=4) as (engine, server):
        transformer = engine.executor.worker.pipeline.transformer
        monkeypatch.setattr(transformer, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        broken = server.run_all([_request(engine, "a red circle", i, steps=2, guidance_scale=1.0) for i in (1, 2)])
        monkeypatch.undo()
        later = server.run_all([_request(engine, "a blue square", 3, steps=2, guidance_scale=1.0)])
        status = server.status
    assert [(out.error_type, "boom" in out.error) for out in broken] == [("internal", True)] * 2
    assert later[0].error is None and status == "ready"
