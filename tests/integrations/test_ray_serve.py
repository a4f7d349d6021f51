"""diffserve on Ray Serve: the documented command starts a local Ray instance (CPU) and deploys the app
with 2 replicas; the worked example's openai client gets the images the offline engine makes. The
flags become Ray's placement (one bundle of world-size GPUs per replica) and autoscaling options."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve")

from diffserve import Omni, OmniDiffusionSamplingParams  # noqa: E402
from diffserve.engine.multiproc_executor import get_free_port  # noqa: E402
from diffserve.integrations.ray_serve import app_builder, app_parser, build_application  # noqa: E402
from tests.conftest import REPO  # noqa: E402

EXAMPLE = Path(REPO) / "examples" / "online_serving" / "ray_serve" / "burst.py"
PROMPT = "a green triangle"


def replica_processes() -> int:
    """Ray's replica actors of the app (Ray titles each process after its actor)."""
    count = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                count += f.read().startswith(b"ray::ServeReplica:diffserve:DiffServe")
        except OSError:
            pass
    return count


@pytest.fixture(scope="module")
def ray_app(tiny_checkpoint, tmp_path_factory):
    port = get_free_port()
    log = open(tmp_path_factory.mktemp("ray") / "ray_serve.log", "w+")
    # A new local Ray instance (--address local), never one another process started.
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffserve.integrations.ray_serve", tiny_checkpoint("demo-dit"), "--address", "local",
         "--port", str(port), "--num-replicas", "2", "--cpus-per-replica", "0.5", "--device", "cpu",
         "--dtype", "float32", "--max-batch-size", "1", "--disable-progress-bar"],
        stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO, env={**os.environ, "DIFFSERVE_LOG_LEVEL": "WARNING"})
    try:
        deadline = time.monotonic() + 240
        # serve.run returns (and the command says "serving") once every replica runs.
        while "serving" not in Path(log.name).read_text():
            assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)  # the app is deleted and the local Ray instance stopped
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0, Path(log.name).read_text()
    assert replica_processes() == 0


def test_openai_client_gets_the_offline_engines_images_from_two_replicas(ray_app, tiny_checkpoint, tmp_path):
    assert replica_processes() == 2
    run = subprocess.run([sys.executable, str(EXAMPLE), "--url", ray_app, "--prompt", PROMPT, "--requests", "4",
                          "--size", "32x32", "--steps", "2", "--seed", "5", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    params = [OmniDiffusionSamplingParams(seed=5 + i, num_inference_steps=2, height=32, width=32) for i in range(4)]
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", max_batch_size=1,
              disable_progress_bar=True) as omni:
        offline = omni.generate([PROMPT] * 4, params)
    for i, out in enumerate(offline):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{i}.png")), np.asarray(out.images[0]))


def options(application) -> dict:
    """The deployment options an application was built with (Ray's own record of them)."""
    deployment = application._bound_deployment
    config = deployment._deployment_config
    autoscaling = config.autoscaling_config
    return {"num_replicas": config.num_replicas, "max_ongoing_requests": config.max_ongoing_requests,
            "actor": deployment._replica_config.ray_actor_options,
            "bundles": deployment._replica_config.placement_group_bundles,
            "autoscaling": autoscaling and (autoscaling.min_replicas, autoscaling.max_replicas,
                                            autoscaling.target_ongoing_requests)}


def test_flags_become_placement_and_autoscaling(tiny_checkpoint):
    model = tiny_checkpoint("demo-dit")
    # A replica of Ulysses 2 on GPUs: one bundle of 2 GPUs (one machine), its actor holding both.
    gpu = options(build_application(app_parser("test").parse_args(
        [model, "--ulysses-degree", "2", "--max-batch-size", "2", "--min-replicas", "1", "--max-replicas", "4"])))
    assert gpu["bundles"] == [{"CPU": 1.0, "GPU": 2}] and gpu["actor"]["num_gpus"] == 2
    assert gpu["autoscaling"] == (1, 4, 2) and gpu["max_ongoing_requests"] == 4
    # `serve run`'s key=value form parses through the same flags.
    cpu = options(app_builder({"model": model, "device": "cpu", "num-replicas": "3", "enforce_eager": "true"}))
    assert cpu["bundles"] == [{"CPU": 1.0}] and cpu["num_replicas"] == 3 and cpu["autoscaling"] is None
    for flags, message in ((["--data-parallel-size", "2"], "Ray runs the replicas"),
                           (["--num-replicas", "2", "--max-replicas", "3"], "not both"),
                           (["--target-ongoing-requests", "3"], "needs --max-replicas"),
                           (["--num-replicas", "0"], "--num-replicas must be positive"),
                           (["--device", "cuda:1"], "not a numbered GPU")):
        with pytest.raises(ValueError, match=message):
            build_application(app_parser("test").parse_args([model, *flags]))
