"""Memory in the server's /metrics: each pipeline call's peak GPU memory (histogram), the highest per
stage, and each rank's peak host memory while loading."""

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from diffserve.request import DiffusionOutput
from diffserve.server.metrics import ServerMetrics

GIB = 1024**3


def _output(**metrics):
    return DiffusionOutput(metrics={"num_inference_steps": 2, "denoise_s": 1.0, **metrics})


def _samples(metrics: ServerMetrics) -> dict:
    """{(sample name, sorted labels): value} of everything rendered."""
    families = text_string_to_metric_families(metrics.render().decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_gpu_peaks_of_each_call_and_the_highest_per_stage():
    metrics = ServerMetrics()
    metrics.observe_batch([], [_output(encode_peak_gpu_bytes=3 * GIB, denoise_peak_gpu_bytes=20 * GIB,
                                       peak_gpu_bytes=20 * GIB)], 1.0)
    metrics.observe_batch([], [_output(encode_peak_gpu_bytes=2 * GIB, denoise_peak_gpu_bytes=30 * GIB,
                                       peak_gpu_bytes=30 * GIB)], 1.0)
    samples = _samples(metrics)
    assert samples["diffserve_request_peak_gpu_bytes_count", ()] == 2
    assert samples["diffserve_request_peak_gpu_bytes_sum", ()] == 50 * GIB
    buckets = {float(labels[0][1]): value for (name, labels), value in samples.items()
               if name == "diffserve_request_peak_gpu_bytes_bucket"}
    assert buckets[16 * GIB] == 0 and buckets[32 * GIB] == 2
    assert samples["diffserve_peak_gpu_bytes", (("stage", "encode"),)] == 3 * GIB
    assert samples["diffserve_peak_gpu_bytes", (("stage", "denoise"),)] == 30 * GIB
    assert samples["diffserve_peak_gpu_bytes", (("stage", "request"),)] == 30 * GIB


def test_a_cpu_run_reports_no_gpu_memory():
    metrics = ServerMetrics()
    metrics.observe_batch([], [_output()], 1.0)
    samples = _samples(metrics)
    assert samples["diffserve_request_peak_gpu_bytes_count", ()] == 0
    assert not [key for key in samples if key[0] == "diffserve_peak_gpu_bytes"]


def _replica(index, engine):
    return SimpleNamespace(index=index, status="ready", running=[], completed_steps=0, restarts=0, preemptions=0,
                           healthy=True, engine=engine)


def test_each_ranks_peak_host_memory_while_loading():
    """Per data-parallel replica and rank; a replica still loading has no report yet."""
    report = [{"load_s": 1.0, "peak_host_bytes": 5 * GIB}, {"load_s": 1.0, "peak_host_bytes": 6 * GIB}]
    replicas = [_replica(0, SimpleNamespace(load_report=report)), _replica(1, None)]
    engine = SimpleNamespace(loaded=True, queue_depth=0, running_requests=0, completed_steps=0, replicas=replicas)
    metrics = ServerMetrics()
    metrics.observe_state(SimpleNamespace(status="ready", engine=engine))
    samples = _samples(metrics)
    assert samples["diffserve_load_peak_host_bytes", (("rank", "0"), ("replica", "0"))] == 5 * GIB
    assert samples["diffserve_load_peak_host_bytes", (("rank", "1"), ("replica", "0"))] == 6 * GIB
    assert not [key for key in samples if key[0] == "diffserve_load_peak_host_bytes" and ("replica", "1") in key[1]]
