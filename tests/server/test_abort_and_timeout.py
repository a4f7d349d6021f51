"""Bounded work: a request estimated beyond the budget is refused up front; one past --request-timeout
is stopped with 504; a client that leaves frees the engine (its request stops at the next step)."""

import re
import time

import httpx

LONG = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 1000, "seed": 0}
SHORT = {"prompt": "a fox", "size": "16x16", "num_inference_steps": 1, "seed": 0}


def _steps_completed(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^diffserve_denoise_steps_completed (\S+)$", text, re.M).group(1))


def test_work_over_the_budget_is_refused_up_front(start_server, tiny_flux):
    server = start_server(tiny_flux, "--max-work-seconds", "1")
    r = httpx.post(f"{server.url}/v1/images/generations", json=LONG, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "1000 steps) is estimated at" in error["message"] and "over its limit of 1 s" in error["message"]
    assert error["param"] == "height"
    assert _steps_completed(server.url) == 0  # refused before anything ran


def test_request_timeout_is_504_and_the_engine_is_freed(start_server, tiny_flux):
    server = start_server(tiny_flux, "--request-timeout", "1", "--max-work-seconds", "0", "--max-batch-size", "1")
    r = httpx.post(f"{server.url}/v1/images/generations", json=LONG, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    # The stopped request does not hold the engine for 1000 steps: it goes back to ready long before.
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/health").json()["status"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ready"
    assert _steps_completed(server.url) < 500


def test_client_disconnect_aborts_the_request(start_server, tiny_flux):
    server = start_server(tiny_flux, "--max-batch-size", "1", "--max-work-seconds", "0")
    try:
        httpx.post(f"{server.url}/v1/images/generations", json=LONG, timeout=1.0)
    except httpx.ReadTimeout:
        pass  # the client gives up and closes the connection
    assert httpx.post(f"{server.url}/v1/images/generations", json=SHORT, timeout=60).status_code == 200
    assert _steps_completed(server.url) < 500  # the abandoned request stopped early
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="499"' in metrics
