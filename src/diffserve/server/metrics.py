"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# The *_created timestamps double every series for no use here.
disable_created_metrics()

STATES = ("starting", "ready", "busy", "recovering", "draining", "failed")
REPLICA_STATES = ("starting", "ready", "busy", "recovering", "failed")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
GPU_BYTES_BUCKETS = tuple(2**k * 1024**3 for k in range(-2, 9))  # 0.25 GiB .. 256 GiB
PEAK_SUFFIX = "_peak_gpu_bytes"


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "diffserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.queue_depth = Gauge("diffserve_queue_depth", "requests waiting for the engine", registry=self.registry)
        self.batch_size = Histogram(
            "diffserve_batch_size", "prompts per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=self.registry,
        )
        self.step_latency = Histogram(
            "diffserve_denoise_step_seconds", "time per denoise step", buckets=STEP_BUCKETS, registry=self.registry
        )
        self.e2e_latency = Histogram(
            "diffserve_request_seconds", "end-to-end request latency", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.outputs = Counter(
            "diffserve_outputs", "images, videos and audio clips generated", ["kind"], registry=self.registry
        )
        self.running = Gauge("diffserve_running_requests", "requests in the running batch", registry=self.registry)
        self.queue_wait = Histogram(
            "diffserve_queue_wait_seconds", "time requests waited before their batch started", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.steps = Gauge("diffserve_denoise_steps_completed", "denoise steps completed since start",
                           registry=self.registry)
        self.health = Gauge("diffserve_engine_state", "1 for the engine's current state", ["state"],
                            registry=self.registry)
        self.memory = Gauge("diffserve_process_resident_bytes", "resident memory of the server process",
                            registry=self.registry)
        # Per data-parallel replica (one replica without data parallelism: replica="0").
        self.replica_state = Gauge("diffserve_replica_state", "1 for each replica's current state",
                                   ["replica", "state"], registry=self.registry)
        self.replica_running = Gauge("diffserve_replica_running_requests", "requests in the replica's running batch",
                                     ["replica"], registry=self.registry)
        self.replica_steps = Gauge("diffserve_replica_denoise_steps_completed", "denoise steps the replica completed",
                                   ["replica"], registry=self.registry)
        self.replica_requests = Counter("diffserve_replica_requests", "requests the replica answered, by outcome",
                                        ["replica", "outcome"], registry=self.registry)
        self.replica_restarts = Gauge("diffserve_replica_restarts", "times the replica's worker group was restarted",
                                      ["replica"], registry=self.registry)
        self.replicas_healthy = Gauge("diffserve_replicas_healthy", "replicas that can take work",
                                      registry=self.registry)
        self.request_peak_gpu = Histogram(
            "diffserve_request_peak_gpu_bytes", "peak GPU memory held by tensors during a pipeline call (rank 0)",
            buckets=GPU_BYTES_BUCKETS, registry=self.registry,
        )
        self.peak_gpu = Gauge(
            "diffserve_peak_gpu_bytes", "highest GPU memory held by tensors since start, per stage ('request': whole "
            "pipeline calls; rank 0)", ["stage"], registry=self.registry,
        )
        self._peaks: dict[str, int] = {}
        # batching="step": every step of every replica's running batch.
        self.step_batch_samples = Histogram(
            "diffserve_step_batch_samples", "samples in each denoise step of a step-level batch (its occupancy)",
            ["replica"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=self.registry,
        )
        self.step_preemptions = Gauge(
            "diffserve_replica_step_preemptions", "step boundaries where the replica parked its running requests "
            "for a waiting request of another step key", ["replica"], registry=self.registry,
        )
        self.load_peak_host = Gauge("diffserve_load_peak_host_bytes", "peak host memory of each rank while loading",
                                    ["replica", "rank"], registry=self.registry)

    def observe_state(self, state) -> None:
        """Gauges read at scrape time."""
        for name in STATES:
            self.health.labels(state=name).set(1 if state.status == name else 0)
        self.memory.set(resident_bytes())
        engine = state.engine
        if engine.loaded:
            self.queue_depth.set(engine.queue_depth)
            self.running.set(engine.running_requests)
            self.steps.set(engine.completed_steps)
        self.replicas_healthy.set(sum(r.healthy for r in engine.replicas))
        for replica in engine.replicas:
            label = str(replica.index)
            for name in REPLICA_STATES:
                self.replica_state.labels(replica=label, state=name).set(1 if replica.status == name else 0)
            self.replica_running.labels(replica=label).set(len(replica.running))
            self.replica_steps.labels(replica=label).set(replica.completed_steps)
            self.replica_restarts.labels(replica=label).set(replica.restarts)
            self.step_preemptions.labels(replica=label).set(replica.preemptions)
            for rank, stats in enumerate(getattr(replica.engine, "load_report", None) or []):
                self.load_peak_host.labels(replica=label, rank=str(rank)).set(stats["peak_host_bytes"])

    def observe_batch(self, requests, outputs, elapsed_s: float) -> None:
        """A request-level batch (pipeline call) finished."""
        self.batch_size.observe(sum(len(r.prompts) for r in requests))
        for out in outputs:
            steps = out.metrics.get("num_inference_steps")
            if out.error is None and steps and "denoise_s" in out.metrics:
                self.step_latency.observe(out.metrics["denoise_s"] / steps)
                break  # one batch, one step time
        self.observe_outputs(outputs)

    def observe_step(self, replica: int, samples: int, seconds: float) -> None:
        """A step of a step-level batch ran."""
        self.step_batch_samples.labels(replica=str(replica)).observe(samples)
        self.step_latency.observe(seconds)

    def observe_outputs(self, outputs) -> None:
        """Requests a replica answered (of a request-level batch, or under batching="step" as each finished)."""
        for out in outputs:
            self.replica_requests.labels(replica=str(out.metrics.get("replica", 0)),
                                         outcome="ok" if out.error is None else "error").inc()
        for out in outputs:
            if "queue_s" in out.metrics:
                self.queue_wait.observe(out.metrics["queue_s"])
        self.observe_gpu_memory(next((out.metrics for out in outputs if out.error is None), {}))

    def observe_gpu_memory(self, metrics: dict) -> None:
        """One pipeline call's peaks (CUDA only: a CPU run reports none)."""
        if "peak_gpu_bytes" in metrics:
            self.request_peak_gpu.observe(metrics["peak_gpu_bytes"])
        for key, value in metrics.items():
            if key.endswith(PEAK_SUFFIX) or key == "peak_gpu_bytes":
                stage = key[: -len(PEAK_SUFFIX)] if key.endswith(PEAK_SUFFIX) else "request"
                self._peaks[stage] = max(self._peaks.get(stage, 0), value)
                self.peak_gpu.labels(stage=stage).set(self._peaks[stage])

    def render(self) -> bytes:
        return generate_latest(self.registry)


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
