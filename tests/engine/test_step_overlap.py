"""batching="step" with step_overlap_stages: begin (encode, prepare) and finish (decode) run on the
worker's stage thread while the running batch keeps stepping. Outputs equal each request run alone;
the batch steps on while a begin or a finish is held (gates the test opens after observing the steps),
errors and callers that leave end only their request. Tiny models, fp32 on a CPU (the thread runs
there too); the CUDA stream version is marked gpu."""

import asyncio
import threading
import time

import pytest

from diffserve import Omni
from diffserve.config import OmniDiffusionConfig
from tests.engine.test_step_batching import (STEP_CACHES, TOLERANCE, _max_error_vs_alone, _request,
                                             _run_staggered)
from tests.engine.test_step_serving import serving

GATE_TIMEOUT_S = 20  # a test that fails to open a gate fails instead of hanging


def _overlapped(path, device="cpu"):
    return Omni(path, dtype="float32", device=device, batching="step", max_batch_size=4, step_max_wait=2,
                step_overlap_stages=True, disable_progress_bar=True)


@pytest.fixture(scope="module")
def demo(tiny_checkpoint):
    with _overlapped(tiny_checkpoint("demo-dit")) as omni:
        yield omni.engine


class Gates:
    """Wraps the pipeline's `stage` ("begin" or "finish"): the call for a gated request waits until the
    test opens its gate, or raises the gate's error."""

    def __init__(self, engine, stage, monkeypatch):
        self.pipeline = engine.executor.worker.pipeline
        self.original = getattr(self.pipeline, stage)
        self.held, self.errors, self.entered = {}, {}, set()
        monkeypatch.setattr(self.pipeline, stage, self._call)

    def hold(self, req):
        self.held[req.request_id] = threading.Event()

    def fail(self, req, exc):
        self.errors[req.request_id] = exc

    def open(self, req):
        self.held[req.request_id].set()

    def _call(self, arg):
        rid = arg.request_id if hasattr(arg, "request_id") else arg.req.request_id
        self.entered.add(rid)
        if rid in self.held:
            assert self.held[rid].wait(GATE_TIMEOUT_S), "the test never opened the gate"
        if rid in self.errors:
            raise self.errors[rid]
        return self.original(arg)


def _steps_until(batcher, condition, limit=20):
    outputs = []
    for _ in range(limit):
        if condition():
            return outputs
        outputs += batcher.step()
    raise AssertionError("condition not reached")


def _wait_for(condition):
    """The stage thread's doing, waited for without stepping (so nothing depends on its timing)."""
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "the stage thread never got there"
        time.sleep(0.001)


def _job_done(engine):
    return lambda: not engine.executor.worker._stages._done.empty()


def test_demo_staggered_mixed_steps_and_cfg_equal_alone(demo):
    reqs = [
        _request(demo, "a red circle", 1, steps=5, guidance_scale=3.0, negative="noise"),
        _request(demo, "a blue square", 2, steps=3, guidance_scale=5.0, negative="blur"),
        _request(demo, "a green line", 3, steps=4, guidance_scale=4.0, negative="dark"),
    ]
    outputs, occupancy = _run_staggered(demo, {0: reqs[:1], 1: reqs[1:2], 3: reqs[2:]})
    assert max(occupancy) > 1  # they shared steps
    for req in reqs:
        assert _max_error_vs_alone(demo, req, outputs[req.request_id]) <= TOLERANCE


def test_flux_staggered_equal_alone(tiny_flux):
    with _overlapped(tiny_flux) as omni:
        engine = omni.engine
        reqs = [_request(engine, "a fox", 1, steps=3, true_cfg_scale=4.0, negative="blur"),
                _request(engine, "a car", 2, steps=2, true_cfg_scale=2.0, negative="noise")]
        outputs, _ = _run_staggered(engine, {0: reqs[:1], 1: reqs[1:]})
        for req in reqs:
            assert _max_error_vs_alone(engine, req, outputs[req.request_id]) <= TOLERANCE


def test_a_step_cache_keeps_its_state_per_request_with_overlap(tiny_checkpoint):
    """tea_cache's per-request state begins when a request joins and ends when it leaves, on the step
    thread: each request skips the steps it skips alone and equals its output alone."""
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", batching="step", max_batch_size=4,
              step_overlap_stages=True, cache_backend="tea_cache", cache_config=STEP_CACHES["tea_cache"],
              disable_progress_bar=True) as omni:
        engine = omni.engine
        reqs = [_request(engine, p, seed, steps=steps, guidance_scale=3.0)
                for p, seed, steps in (("a red circle", 1, 7), ("a blue square", 2, 5))]
        outputs, _ = _run_staggered(engine, {0: reqs[:1], 2: reqs[1:]})
        for req in reqs:
            out, alone = outputs[req.request_id], engine.run_batch([req])[0]
            assert out.metrics["cached_steps"] == alone.metrics["cached_steps"] > 0
            assert (out.images - alone.images).abs().max().item() <= TOLERANCE


def test_the_batch_steps_while_a_newcomer_is_encoded(demo, monkeypatch):
    gates = Gates(demo, "begin", monkeypatch)
    a = _request(demo, "a red circle", 1, steps=6, guidance_scale=3.0)
    b = _request(demo, "a blue square", 2, steps=2, guidance_scale=5.0)
    gates.hold(b)
    batcher = demo.step_batcher()
    batcher.add(a)
    batcher.step()
    batcher.add(b)
    batcher.step()  # b's begin goes to the stage thread; a steps
    _wait_for(lambda: b.request_id in gates.entered)
    outputs = [out for _ in range(3) for out in batcher.step()]
    assert outputs == [] and batcher.occupancy == [1, 1, 1, 1, 1]  # a stepped on, alone
    assert b.request_id in batcher.beginning
    gates.open(b)
    _wait_for(_job_done(demo))
    outputs = {out.request_id: out for out in batcher.run_all()}
    assert outputs[a.request_id].metrics["step_batch_occupancy"] == [1, 1, 1, 1, 1, 2]  # b joined at once
    for req in (a, b):
        assert _max_error_vs_alone(demo, req, outputs[req.request_id]) <= TOLERANCE


def test_the_batch_steps_while_a_finished_request_is_decoded(demo, monkeypatch):
    gates = Gates(demo, "finish", monkeypatch)
    a = _request(demo, "a red circle", 1, steps=2, guidance_scale=3.0)
    b = _request(demo, "a blue square", 2, steps=6, guidance_scale=5.0)
    gates.hold(a)
    batcher = demo.step_batcher()
    batcher.add(a)
    batcher.add(b)
    outputs = _steps_until(batcher, lambda: a.request_id in batcher.finishing)
    _wait_for(lambda: a.request_id in gates.entered)
    stepped = len(batcher.occupancy)
    outputs += [out for _ in range(2) for out in batcher.step()]
    assert outputs == [] and len(batcher.occupancy) == stepped + 2  # b stepped on
    assert a.request_id in batcher.finishing
    gates.open(a)
    outputs = {out.request_id: out for out in batcher.run_all()}
    assert sorted(outputs) == sorted([a.request_id, b.request_id])
    for req in (a, b):
        assert _max_error_vs_alone(demo, req, outputs[req.request_id]) <= TOLERANCE


@pytest.mark.parametrize("stage", ["begin", "finish"])
def test_an_error_in_a_stage_answers_that_request_only(demo, monkeypatch, stage):
    gates = Gates(demo, stage, monkeypatch)
    a = _request(demo, "a red circle", 1, steps=2, guidance_scale=3.0)
    b = _request(demo, "a blue square", 2, steps=3, guidance_scale=5.0)
    gates.fail(a, RuntimeError(f"{stage} broke"))
    batcher = demo.step_batcher()
    batcher.add(a)
    batcher.add(b)
    outputs = {out.request_id: out for out in batcher.run_all()}
    assert f"{stage} broke" in outputs[a.request_id].error
    assert outputs[b.request_id].error is None and not demo.executor.worker._running


@pytest.mark.parametrize("stage", ["begin", "finish"])
def test_a_caller_that_leaves_during_a_stage_is_answered_once(demo, monkeypatch, stage):
    gates = Gates(demo, stage, monkeypatch)
    a = _request(demo, "a red circle", 1, steps=2, guidance_scale=3.0)
    b = _request(demo, "a blue square", 2, steps=6, guidance_scale=5.0)
    gates.hold(a)
    batcher = demo.step_batcher()
    batcher.add(b)
    outputs = batcher.step()  # b runs, so the batch has something to step while a is held
    entry = batcher.add(a)
    held = batcher.beginning if stage == "begin" else batcher.finishing
    outputs += _steps_until(batcher, lambda: a.request_id in held)
    _wait_for(lambda: a.request_id in gates.entered)
    entry.cancelled = True
    outputs += batcher.step()
    assert [(out.request_id, out.error_type) for out in outputs] == [(a.request_id, "aborted")]
    gates.open(a)
    outputs += batcher.run_all()
    assert [out.request_id for out in outputs] == [a.request_id, b.request_id]  # a answered once
    assert outputs[1].error is None and not demo.executor.worker._running


def test_the_server_answers_every_request_once_with_overlap(tiny_checkpoint):
    with serving(tiny_checkpoint("demo-dit"), max_batch_size=4, step_overlap_stages=True) as (engine, server):
        reqs = [_request(engine, f"prompt {i}", i, steps=2 + i, guidance_scale=3.0) for i in range(3)]
        alone = {req.request_id: engine.run_batch([req])[0].images for req in reqs}

        async def scenario():
            return await asyncio.gather(*(server.submit(req).wait() for req in reqs))

        outputs = asyncio.run(scenario())
    assert [out.request_id for out in outputs] == [req.request_id for req in reqs]
    for out in outputs:
        assert out.error is None
        assert (out.images - alone[out.request_id]).abs().max().item() <= TOLERANCE


def test_step_overlap_stages_errors(tiny_checkpoint):
    path = tiny_checkpoint("demo-dit")
    assert not OmniDiffusionConfig(model=path, device="cpu", batching="step").step_overlap_stages  # opt-in
    refused = {
        "applies to batching='step' only": {"step_overlap_stages": True},
        "cannot be used with CPU offload": {"batching": "step", "step_overlap_stages": True,
                                            "enable_cpu_offload": True},
        "one process per replica": {"batching": "step", "step_overlap_stages": True,
                                    "parallel_config": {"cfg_parallel_size": 2}},
        "must be a bool": {"batching": "step", "step_overlap_stages": "yes"},
    }
    for message, kwargs in refused.items():
        with pytest.raises(ValueError, match=message):
            OmniDiffusionConfig(model=path, device="cpu", **kwargs)


@pytest.mark.gpu
def test_cuda_side_stream_staggered_equal_alone(tiny_checkpoint):
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cuda", batching="step", max_batch_size=4,
              step_overlap_stages=True, disable_progress_bar=True) as omni:
        engine = omni.engine
        reqs = [_request(engine, f"prompt {i}", i, steps=3 + i, guidance_scale=3.0, negative="blur")
                for i in range(3)]
        outputs, _ = _run_staggered(engine, {0: reqs[:1], 1: reqs[1:2], 2: reqs[2:]})
        for req in reqs:  # fp32 on a GPU: the batch size may change the kernels' rounding
            assert _max_error_vs_alone(engine, req, outputs[req.request_id]) <= 1e-4
