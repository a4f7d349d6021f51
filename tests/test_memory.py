"""Peak memory in DiffusionOutput.metrics (per stage and per request) and the load report.

The CPU has no allocator statistics, so a fake probe plays the GPU's: it returns a scripted peak per
reading, and each reset starts from the current level, as torch.cuda's does.
"""

import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.memory import PeakMemory, peak_host_rss_bytes
from diffserve.models.stage_timer import StageTimer


class FakePeak:
    """Allocator stand-in: `level` is what tensors hold now; the peak is the highest level since reset."""

    def __init__(self):
        self.level = 0
        self.high = 0
        self.resets = 0

    def allocate(self, nbytes: int) -> None:
        self.level += nbytes
        self.high = max(self.high, self.level)

    def free(self, nbytes: int) -> None:
        self.level -= nbytes

    def reset(self) -> None:
        self.high = self.level
        self.resets += 1

    def peak(self) -> int:
        return self.high


def test_stage_peaks_and_the_peak_between_stages_are_kept():
    memory = FakePeak()
    timer = StageTimer(torch.device("cpu"), memory)
    memory.allocate(100)  # before any stage (the worker's reset came before this)
    memory.free(100)
    with timer.stage("encode"):
        memory.allocate(30)
        memory.free(30)
    memory.allocate(500)  # between stages
    memory.free(450)
    with timer.stage("denoise"):
        memory.allocate(200)
        memory.free(200)
    assert timer.timings["encode_peak_gpu_bytes"] == 30
    assert timer.timings["denoise_peak_gpu_bytes"] == 250  # 50 still held + 200
    assert timer.timings["peak_gpu_bytes"] == 500
    assert set(timer.timings) == {"encode_s", "denoise_s", "encode_peak_gpu_bytes", "denoise_peak_gpu_bytes",
                                  "peak_gpu_bytes"}


def test_no_memory_figures_on_a_cpu():
    timer = StageTimer(torch.device("cpu"))
    with timer.stage("encode"):
        pass
    assert set(timer.timings) == {"encode_s"}


def test_requests_report_their_peaks(tiny_flux, monkeypatch):
    """Through the engine: every stage's peak and the request's, from the probe the worker resets."""
    probes = []

    def fake_for_device(device):
        probe = FakePeak()
        probe.allocate(len(probes) + 1)  # each probe reports its own size, to tell them apart
        probes.append(probe)
        return probe

    monkeypatch.setattr(PeakMemory, "for_device", staticmethod(fake_for_device))
    with Omni(tiny_flux, dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        probes.clear()
        out = omni.generate("a fox", OmniDiffusionSamplingParams(num_inference_steps=1, max_sequence_length=8))[0]
    worker_probe, timer_probe = probes  # made by the worker, then by the pipeline's stage timer
    assert worker_probe.resets == 1 and timer_probe.resets == 4  # one per stage
    for stage in ("encode", "prepare", "denoise", "decode"):
        assert out.metrics[f"{stage}_peak_gpu_bytes"] == 2
    assert out.metrics["peak_gpu_bytes"] == 2


def test_load_report_per_rank(flux_omni):
    (report,) = flux_omni.engine.load_report
    assert report["load_s"] > 0
    assert 0 < report["peak_host_bytes"] <= peak_host_rss_bytes()


def test_a_stage_waits_for_the_compute_stream_only(monkeypatch):
    """Not for a side stream's copies for a later stage (offload fetches the next request's encoders
    while the VAE decodes): the request ends when its own work does."""
    synced = []

    class Stream:
        def synchronize(self):
            synced.append("compute stream")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append("device"))
    timer = StageTimer(torch.device("cuda", 0), FakePeak())
    with timer.stage("decode"):
        pass
    assert synced == ["compute stream"] and "decode_s" in timer.timings
