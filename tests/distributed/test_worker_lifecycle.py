"""Worker processes: startup errors surface, a dead worker fails fast, nothing outlives the engine."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams


def alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_close_leaves_no_worker(tiny_flux):
    omni = Omni(tiny_flux, dtype="float32", device="cpu", tensor_parallel_size=2)
    pids = omni.engine.executor.pids
    assert all(alive(p) for p in pids)
    omni.close()
    assert wait_dead(pids) == []


def test_invalid_request_is_a_value_error_and_workers_keep_serving(tiny_flux):
    with Omni(tiny_flux, dtype="float32", device="cpu", tensor_parallel_size=2) as omni:
        with pytest.raises(ValueError, match="height=30 is not supported"):
            omni.generate("x", OmniDiffusionSamplingParams(height=30, num_inference_steps=1))
        out = omni.generate("x", OmniDiffusionSamplingParams(height=16, width=16, num_inference_steps=1, seed=0))
        assert out[0].images[0].size == (16, 16) and omni.engine.is_healthy()


def test_startup_error_names_the_problem(tiny_flux):
    # The tiny FLUX has 2 heads: 3-way TP cannot split them. Raised before any weight is loaded.
    with pytest.raises(ValueError, match=r"number of heads \(2\) is not divisible by the tensor parallel size \(3\)"):
        Omni(tiny_flux, dtype="float32", device="cpu", tensor_parallel_size=3)


def test_killed_worker_fails_the_request_fast_and_marks_unhealthy(tiny_flux):
    omni = Omni(tiny_flux, dtype="float32", device="cpu", tensor_parallel_size=2)
    pids = omni.engine.executor.pids
    result = {}

    def run():
        start = time.monotonic()
        try:
            omni.generate("a fox", OmniDiffusionSamplingParams(height=64, width=64, num_inference_steps=2000, seed=0))
        except Exception as exc:
            result["error"] = exc
        result["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(3.0)  # mid-denoise
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert time.monotonic() - killed_at < 30
    assert isinstance(result.get("error"), RuntimeError) and "died" in str(result["error"])
    assert not omni.engine.is_healthy()
    with pytest.raises(RuntimeError, match="not running"):
        omni.generate("again", OmniDiffusionSamplingParams(height=16, width=16, num_inference_steps=1))
    omni.close()
    assert wait_dead(pids) == []


def test_interpreter_exit_without_close_leaves_no_worker(tiny_flux):
    script = textwrap.dedent(f"""
        from diffserve import Omni
        omni = Omni({tiny_flux!r}, dtype="float32", device="cpu", tensor_parallel_size=2)
        print("PIDS", *omni.engine.executor.pids, flush=True)
    """)  # no close(), no main guard
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split("PIDS")[1].split()]
    assert len(pids) == 2 and wait_dead(pids) == []


def test_torchrun_launch_matches_single_process(tiny_flux, tmp_path):
    """Under torchrun each process is one rank running the same script; rank 0 gets the images."""
    script = tmp_path / "spmd.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from diffserve import Omni, OmniDiffusionSamplingParams
        sp = OmniDiffusionSamplingParams(height=32, width=32, num_inference_steps=2, max_sequence_length=8,
                                         output_type="pt")
        with Omni({tiny_flux!r}, dtype="float32", device="cpu", tensor_parallel_size=2) as omni:
            out = omni.generate("a fox", sp)[0]  # seed drawn on each rank; rank 0's wins
        torch.save((out.images, out.seed), {str(tmp_path)!r} + f"/out{{os.environ['RANK']}}.pt")
    """))
    from diffserve.engine.multiproc_executor import get_free_port

    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(get_free_port()), str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    images, seed = torch.load(tmp_path / "out0.pt")
    rank1_images, rank1_seed = torch.load(tmp_path / "out1.pt")
    assert rank1_seed == seed and rank1_images is None  # ranks agree on the seed; only rank 0 decodes images
    with Omni(tiny_flux, dtype="float32", device="cpu") as omni:
        sp = OmniDiffusionSamplingParams(height=32, width=32, num_inference_steps=2, max_sequence_length=8,
                                         output_type="pt", seed=seed)
        expected = omni.generate("a fox", sp)[0].images
    assert (images - expected).abs().max().item() <= 1e-4
