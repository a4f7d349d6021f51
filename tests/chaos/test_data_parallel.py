"""A server with 2 data-parallel replicas (`--data-parallel-size 2`, each one gloo worker process on
CPU): it makes the images one replica makes for the same seeds, spreads concurrent requests over both
replicas (per-replica metrics say so), and when one replica's worker is killed under load it loses no
request while the other keeps serving; the killed replica then restarts and serves as before. No
process outlives the server."""

import base64
import concurrent.futures
import io
import os
import re
import signal
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams
from tests.conftest import Server, child_pids

GEN = "/v1/images/generations"
SIZE = 32  # the tiny demo model at 32x32 costs a tenth of its 64x64 default
PROMPTS = [f"a {color} {shape}" for color in ("red", "green", "blue", "yellow", "purple", "white")
           for shape in ("circle", "square", "triangle")][:16]
# The load the kill lands in: one prompt and seed (one reference image), enough steps per request
# that both replicas are busy when the kill comes.
LOAD = {"prompt": "a red circle", "seed": 7, "steps": 12}


def post(server, prompt, seed, steps=2):
    return httpx.post(f"{server.url}{GEN}", timeout=180, json={
        "prompt": prompt, "seed": seed, "num_inference_steps": steps, "size": f"{SIZE}x{SIZE}"})


def pixels(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))


def metric(server, name: str) -> dict[str, float]:
    """One per-replica series of /metrics: {replica: value}."""
    text = httpx.get(f"{server.url}/metrics").text
    return {replica: float(value) for replica, value in
            re.findall(rf'^{name}\{{(?:outcome="ok",)?replica="(\d+)"\}} ([\d.e+]+)$', text, re.M)}


def served(server) -> dict[str, float]:
    return metric(server, "diffserve_replica_requests_total")


def health(server) -> tuple[int, dict]:
    r = httpx.get(f"{server.url}/health", timeout=5)
    return r.status_code, r.json()


def worker_pids(server) -> list[int]:
    """The server's spawned worker processes (not multiprocessing's resource tracker)."""
    pids = []
    for pid in child_pids(server.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                pids.append(pid)
    return pids


def wait_until_both_replicas_serve(server, timeout=120):
    deadline = time.monotonic() + timeout
    while health(server)[1]["replicas"]["states"] != ["ready", "ready"]:
        assert time.monotonic() < deadline, f"replicas not ready: {health(server)}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    server = Server(tiny_checkpoint("demo-dit"), "--data-parallel-size", "2", "--max-batch-size", "1")
    # The server answers (and serves) once the first replica has loaded; these tests need both.
    wait_until_both_replicas_serve(server)
    yield server
    pid = server.proc.pid
    server.stop()
    assert server.proc.returncode is not None and not child_pids(pid), "worker processes outlived the server"


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    """What one replica makes offline: seeds 0..15, and the kill test's load (the server's PNGs hold the
    same pixels)."""
    params = [OmniDiffusionSamplingParams(seed=i, num_inference_steps=2, height=SIZE, width=SIZE) for i in range(16)]
    params.append(OmniDiffusionSamplingParams(seed=LOAD["seed"], num_inference_steps=LOAD["steps"], height=SIZE,
                                              width=SIZE))
    # Batches of one, as the server runs them: a batch's size can change the last bit of a pixel.
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", max_batch_size=1,
              disable_progress_bar=True) as omni:
        outs = omni.generate(PROMPTS + [LOAD["prompt"]], params)
    return [np.asarray(out.images[0]) for out in outs]


def test_health_and_metrics_count_the_replicas(server):
    code, body = health(server)
    assert code == 200 and body["replicas"] == {"healthy": 2, "total": 2, "states": ["ready", "ready"]}
    assert len(worker_pids(server)) == 2
    assert metric(server, "diffserve_replica_restarts") == {"0": 0.0, "1": 0.0}


def test_concurrent_requests_spread_over_both_replicas_with_one_replicas_images(server, offline):
    before = served(server)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: post(server, PROMPTS[i], i), range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    after = served(server)
    counts = {r: after.get(r, 0) - before.get(r, 0) for r in ("0", "1")}
    assert counts["0"] >= 1 and counts["1"] >= 1 and sum(counts.values()) == 16, counts
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(pixels(answer), offline[i])


def test_a_killed_replica_loses_no_request_and_the_other_keeps_serving(server, offline):
    workers = worker_pids(server)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, server, LOAD["prompt"], LOAD["seed"], LOAD["steps"]) for _ in range(16)]
        # Kill a worker while both replicas run a request (the others wait in the queue).
        deadline = time.monotonic() + 60
        while metric(server, "diffserve_replica_running_requests") != {"0": 1.0, "1": 1.0}:
            assert time.monotonic() < deadline, "the replicas never ran requests at once"
            time.sleep(0.05)
        served_at_kill = served(server)
        os.kill(workers[0], signal.SIGKILL)
        # Until the killed replica is back, the server keeps serving on the other one: never a 503.
        codes, killed = set(), set()
        while not all(f.done() for f in futures):
            code, body = health(server)
            codes.add(code)
            killed |= {r for r, state in enumerate(body["replicas"]["states"]) if state == "recovering"}
            time.sleep(0.1)
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200]
    for answer in answers:  # the request that was running on the killed replica ran again, alike
        np.testing.assert_array_equal(pixels(answer), offline[16])
    assert codes == {200} and len(killed) == 1
    (index,) = killed
    killed, survivor = str(index), str(1 - index)
    assert served(server)[survivor] > served_at_kill.get(survivor, 0)
    # The killed replica restarts and serves again, exactly as before.
    wait_until_both_replicas_serve(server)
    assert metric(server, "diffserve_replica_restarts") == {killed: 1.0, survivor: 0.0}
    assert workers[0] not in worker_pids(server) and len(worker_pids(server)) == 2
    answers = [post(server, PROMPTS[3], 3) for _ in range(2)]  # one on each replica: they take turns
    for answer in answers:
        assert answer.status_code == 200
        np.testing.assert_array_equal(pixels(answer), offline[3])
