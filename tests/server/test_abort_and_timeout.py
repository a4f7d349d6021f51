"""A request past --request-timeout is aborted with 504; a client that leaves frees the engine."""

import time

import httpx

LONG = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 1000, "seed": 0}
SHORT = {"prompt": "a fox", "size": "16x16", "num_inference_steps": 1, "seed": 0}


def test_request_timeout_is_504_and_the_engine_is_freed(start_server, tiny_flux):
    server = start_server(tiny_flux, "--request-timeout", "1", "--max-batch-size", "1")
    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/images/generations", json=LONG, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert time.monotonic() - start < 10
    # The aborted request stops at its next step instead of holding the engine for 1000 steps.
    start = time.monotonic()
    assert httpx.post(f"{server.url}/v1/images/generations", json=SHORT, timeout=60).status_code == 200
    assert time.monotonic() - start < 10
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_client_disconnect_aborts_the_request(start_server, tiny_flux):
    server = start_server(tiny_flux, "--max-batch-size", "1")
    try:
        httpx.post(f"{server.url}/v1/images/generations", json=LONG, timeout=1.0)
    except httpx.ReadTimeout:
        pass  # the client gives up and closes the connection
    start = time.monotonic()
    assert httpx.post(f"{server.url}/v1/images/generations", json=SHORT, timeout=60).status_code == 200
    assert time.monotonic() - start < 10  # not queued behind 1000 steps
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="499"' in metrics
