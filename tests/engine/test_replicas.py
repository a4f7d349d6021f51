"""Data-parallel replicas behind one scheduler, with stand-in executors (no model runs): batches go to
free replicas, a replica that dies loses none of its requests, and the others serve while it restarts."""

import threading
import time

import pytest

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.engine.engine import DiffusionEngine
from diffserve.engine.executor import Executor
from diffserve.request import DiffusionOutput
from tests.engine.test_engine import COST, SPEC, request


class StandInExecutor(Executor):
    """Echoes each prompt as its 'image' after `delay_s`; a prompt containing "kill" kills this
    worker group (as a dead rank does: the call fails and the executor is unhealthy from then on)."""

    def __init__(self, delay_s=0.2, log=None, name="?", running=None):
        self.delay_s, self.log, self.name = delay_s, log if log is not None else [], name
        # Shared by the replicas: how many run a batch now, and the most that ever did at once.
        self.running = running if running is not None else Concurrency()
        self.healthy = True

    def execute(self, req, progress=None):
        if not self.healthy:
            raise RuntimeError("the worker processes are gone")
        with self.running:
            time.sleep(self.delay_s)
        self.log.append((self.name, [p.prompt for p in req.prompts]))
        if any("kill" in p.prompt for p in req.prompts):
            self.healthy = False
            raise RuntimeError(f"worker rank 0 of {self.name} died")
        return DiffusionOutput(images=[p.prompt for p in req.prompts], metrics={})

    def collective_rpc(self, method, *args):
        return [{"sampling_spec": SPEC, "cost_profile": COST,
                 "load_report": {"load_s": 0.0, "peak_host_bytes": 0}}[method]]

    def request_abort(self): ...
    def start_profile(self, trace_dir): self.trace_dir = trace_dir
    def stop_profile(self): return [f"{self.trace_dir}/trace_rank0.json"]
    def is_healthy(self): return self.healthy
    def kill(self): return True
    def shutdown(self): self.healthy = False


class Concurrency:
    """Counts the batches running at once (entered by each stand-in executor while it 'computes')."""

    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


class StandInReplica(DiffusionEngine):
    """A DiffusionEngine whose restart builds another stand-in executor (after `restart_s`)."""

    def __init__(self, od_config, replica, log, restart_s=0.0, running=None):
        self.log, self.restart_s, self.restarts, self.running = log, restart_s, 0, running
        super().__init__(od_config, executor=self._executor(replica), replica=replica)

    def _executor(self, replica):
        return StandInExecutor(log=self.log, name=f"r{replica}", running=self.running)

    def restart(self):
        time.sleep(self.restart_s)
        self.restarts += 1
        self.executor = self._executor(self.replica)


@pytest.fixture
def od_config(tiny_checkpoint):
    return OmniDiffusionConfig.from_kwargs(tiny_checkpoint("demo-dit"), max_batch_size=1, data_parallel_size=2)


def replicas(od_config, log, restart_s=0.0, running=None):
    return [StandInReplica(od_config, r, log, restart_s, running) for r in range(2)]


def test_batches_run_on_every_free_replica_at_once(od_config):
    log, running = [], Concurrency()
    engine = AsyncDiffusionEngine(replicas(od_config, log, running=running), max_queue=None, batch_wait_ms=0,
                                  step_timeout_s=None)
    try:
        outs = engine.run_all([request(f"p{i}") for i in range(6)])
    finally:
        engine.shutdown()
    assert [o.images for o in outs] == [[f"p{i}"] for i in range(6)]
    served = {name: sum(1 for n, _ in log if n == name) for name in ("r0", "r1")}
    assert served["r0"] >= 1 and served["r1"] >= 1 and sum(served.values()) == 6, served
    assert {o.metrics["replica"] for o in outs} == {0, 1}
    assert running.most == 2  # both replicas ran a batch at the same time


def test_each_batch_goes_to_the_replica_idle_longest(od_config):
    """One request at a time: both replicas are free each time, and they take turns."""
    log = []
    engine = AsyncDiffusionEngine(replicas(od_config, log), max_queue=None, batch_wait_ms=0, step_timeout_s=None)
    try:
        for replica in engine.replicas:
            replica.engine.executor.delay_s = 0.0
        outs = [engine.run_all([request(f"p{i}")])[0] for i in range(5)]
    finally:
        engine.shutdown()
    turns = [o.metrics["replica"] for o in outs]
    assert turns in ([0, 1, 0, 1, 0], [1, 0, 1, 0, 1]), turns


def test_a_replica_that_dies_loses_no_request_and_restarts(od_config):
    log = []
    engines = replicas(od_config, log)
    engine = AsyncDiffusionEngine(engines, max_queue=None, batch_wait_ms=0, step_timeout_s=None)
    try:
        # "kill once" dies on its first run only: the stand-in kills its group, and the request runs
        # again on the other replica, where its prompt no longer kills (see StandInExecutor).
        reqs = [request(f"p{i}") for i in range(5)]
        engines[0].executor.execute = _dies_once(engines[0].executor)
        outs = engine.run_all(reqs)
        deadline = time.monotonic() + 10
        while engine.replica_summary()["healthy"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        summary = engine.replica_summary()
    finally:
        engine.shutdown()
    assert [o.error for o in outs] == [None] * 5, [o.error for o in outs]
    assert [o.images for o in outs] == [[f"p{i}"] for i in range(5)]
    assert engines[0].restarts == 1 and summary == {"healthy": 2, "total": 2, "states": ["ready", "ready"]}


def _dies_once(executor):
    original = executor.execute

    def execute(req, progress=None):
        executor.execute = original
        executor.healthy = False
        raise RuntimeError("worker rank 0 died (killed)")

    return execute


def test_a_request_that_kills_its_replica_runs_again_once_then_fails(od_config):
    """Re-running lets no request be lost to a dead replica; running it only once more keeps a request
    that kills every replica it touches from taking the whole engine down."""
    log = []
    engines = replicas(od_config, log)
    engine = AsyncDiffusionEngine(engines, max_queue=None, batch_wait_ms=0, step_timeout_s=None)
    try:
        outs = engine.run_all([request("kill"), request("fine")])
    finally:
        engine.shutdown()
    assert "died" in outs[0].error and outs[0].error_type == "internal"
    assert outs[1].images == ["fine"]
    assert [prompts for _, prompts in log].count(["kill"]) == 2
    assert sum(e.restarts for e in engines) == 2


def test_the_others_serve_while_a_replica_restarts(od_config):
    log = []
    engines = replicas(od_config, log, restart_s=2.0)
    engine = AsyncDiffusionEngine(engines, max_queue=None, batch_wait_ms=0, step_timeout_s=None)
    try:
        engines[0].executor.execute = _dies_once(engines[0].executor)
        engines[1].executor.delay_s = 0.3
        first = threading.Thread(target=engine.run_all, args=([request("a"), request("b")],))
        first.start()
        deadline = time.monotonic() + 5
        while engine.replica_summary()["states"][0] != "recovering" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.replica_summary()["states"][0] == "recovering"
        assert engine.is_healthy() and engine.status in ("ready", "busy")
        outs = engine.run_all([request("during")])  # accepted and served by replica 1
        assert outs[0].images == ["during"] and outs[0].metrics["replica"] == 1
        # ... before replica 0 came back: it did not wait for the restart.
        assert engine.replica_summary()["states"][0] == "recovering" and engines[0].restarts == 0
        first.join(timeout=10)
    finally:
        engine.shutdown()


def test_when_no_replica_can_serve_queued_work_is_answered(od_config):
    log = []
    engines = replicas(od_config, log)
    engine = AsyncDiffusionEngine(engines, max_queue=None, batch_wait_ms=0, step_timeout_s=None, max_restarts=0)
    try:
        outs = engine.run_all([request("kill 1"), request("kill 2"), request("waiting")])
        assert engine.status == "failed" and not engine.is_healthy()
    finally:
        engine.shutdown()
    assert all(o.error is not None for o in outs)
    assert outs[2].error_type == "unavailable" and "could not recover" in outs[2].error


def test_each_replica_profiles_into_its_own_folder(od_config):
    """Every replica has a rank 0: their traces must not land on the same names."""
    engine = AsyncDiffusionEngine(replicas(od_config, []), max_queue=None, batch_wait_ms=0, step_timeout_s=None)
    try:
        engine.start_profile("/traces")
        paths = engine.stop_profile()
    finally:
        engine.shutdown()
    assert paths == ["/traces/replica0/trace_rank0.json", "/traces/replica1/trace_rank0.json"]
