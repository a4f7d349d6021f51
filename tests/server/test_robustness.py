"""The defects the "never falls over" review found, each pinned by a test: queue slots of clients that
left, job files, job limits and validation, typed multipart fields, sizes, upload formats, slow
bodies, authentication details, model names."""

import asyncio
import io
import os
import socket
import time

import httpx
import pytest
from PIL import Image

GEN = "/v1/images/generations"
VIDEO = {"prompt": "a cat surfing", "size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 3}


def _png(mode="RGB", fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (16, 16), "red" if mode == "RGB" else 0).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def keyed_server(start_server, tiny_flux):
    return start_server(tiny_flux, "--api-key", "s3cret", "--served-model-name", "fox", "flux-alias",
                        "--max-batch-size", "1", "--max-queue", "2", "--body-timeout", "2", "--max-work-seconds", "0")


AUTH = {"Authorization": "Bearer s3cret"}


def test_a_client_that_leaves_frees_its_queue_slot(keyed_server):
    """Clients that give up while queued must not keep the queue full (429 for everyone after)."""
    slow = {"prompt": "x", "size": "64x64", "num_inference_steps": 300}

    async def give_up():
        async with httpx.AsyncClient(timeout=0.5, headers=AUTH) as client:
            await asyncio.gather(*[client.post(f"{keyed_server.url}{GEN}", json=slow) for _ in range(3)],
                                 return_exceptions=True)

    asyncio.run(give_up())
    r = httpx.post(f"{keyed_server.url}{GEN}", headers=AUTH, timeout=120,
                   json={"prompt": "x", "size": "16x16", "num_inference_steps": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("headers, status", [
    ({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "bearer s3cret"}, 200),
    ({"Authorization": "BEARER s3cret"}, 200),
])
def test_api_key_scheme_is_case_insensitive(keyed_server, headers, status):
    assert httpx.get(f"{keyed_server.url}/v1/models", headers=headers).status_code == status


def test_docs_are_behind_the_key_and_health_is_not(keyed_server):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{keyed_server.url}{path}").status_code == 401
        assert httpx.get(f"{keyed_server.url}{path}", headers=AUTH).status_code == 200
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200


def test_the_model_answers_to_every_name_and_the_serve_argument(keyed_server, tiny_flux):
    ids = [m["id"] for m in httpx.get(f"{keyed_server.url}/v1/models", headers=AUTH).json()["data"]]
    assert ids == ["fox", "flux-alias", tiny_flux]
    for name in ids:
        r = httpx.post(f"{keyed_server.url}{GEN}", headers=AUTH, timeout=120,
                       json={"model": name, "prompt": "x", "size": "16x16", "num_inference_steps": 1})
        assert r.status_code == 200, (name, r.text)


def test_a_body_that_never_arrives_is_a_408(keyed_server):
    host, port = keyed_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {GEN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":".encode())
        reply = b""
        while b'"type"' not in reply and (chunk := sock.recv(4096)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in reply


@pytest.mark.parametrize("fields, files, status, text", [
    # A prompt of digits is a prompt; numbers parse by their field's type.
    ({"prompt": "1984", "num_inference_steps": "2", "strength": "0.5"}, None, 200, None),
    ({"prompt": "x", "num_inference_steps": "one"}, None, 400, "num_inference_steps: must be a number"),
    ({"prompt": "x", "size": "\u0661\u0666x16"}, None, 400, "size must look like"),  # Arabic-Indic digits
    ({"prompt": "x", "size": "16x16\n"}, None, 400, "size must look like"),
    ({"prompt": "x"}, {"image": ("a.gif", "GIF")}, 400, "is a GIF image; send png, jpeg or webp"),
    ({"prompt": "x"}, {"image": ("a.tif", "TIFF")}, 400, "is a TIFF image; send png, jpeg or webp"),
])
def test_edit_form_fields_are_typed_and_uploads_checked(keyed_server, fields, files, status, text):
    fmt = (files or {}).get("image", ("a.png", "PNG"))
    r = httpx.post(f"{keyed_server.url}/v1/images/edits", headers=AUTH, timeout=120, data=fields,
                   files={"image": (fmt[0], _png(fmt="PNG" if fmt[1] == "PNG" else fmt[1]))})
    assert r.status_code == status, r.text
    if text:
        assert text in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def video(start_server, tiny_checkpoint, tmp_path_factory):
    jobs = tmp_path_factory.mktemp("jobs")
    server = start_server(tiny_checkpoint("wan2.1-t2v"), "--jobs-dir", str(jobs), "--max-batch-size", "1",
                          "--max-queue", "1")
    return server, jobs


def _job_files(jobs) -> list[str]:
    return sorted(os.listdir(jobs)) if os.path.isdir(jobs) else []


@pytest.mark.parametrize("body, param, text", [
    ({**VIDEO, "num_frames": 8}, "num_frames", "num_frames=8 is not supported by WanPipeline"),
    ({**VIDEO, "size": "30x30"}, "height", "multiple of 16"),
    ({**VIDEO, "num_frames": None, "seconds": 50, "fps": 24}, "seconds", "at most 1025"),
    ({**VIDEO, "seconds": 2, "fps": 8}, "num_frames", "give one of them"),
])
def test_video_parameters_are_checked_before_a_job_exists(video, body, param, text):
    server, jobs = video
    before = _job_files(jobs)
    r = httpx.post(f"{server.url}/v1/videos", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400 and text in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == param
    assert _job_files(jobs) == before  # no job file for a refused request


def test_progress_is_below_100_until_the_video_is_written(video):
    server, _ = video
    job = httpx.post(f"{server.url}/v1/videos", json=VIDEO).json()
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = httpx.get(f"{server.url}/v1/videos/{job['id']}").json()
        seen.append((current["status"], current["progress"]))
        if current["status"] in ("completed", "failed"):
            break
        time.sleep(0.02)
    assert seen[-1] == ("completed", 100)
    assert all(progress < 100 for status, progress in seen if status != "completed")


def test_deleting_a_running_job_stops_it_and_leaves_no_file(video):
    server, jobs = video
    long_job = httpx.post(f"{server.url}/v1/videos", json={**VIDEO, "num_inference_steps": 400}).json()
    time.sleep(0.5)
    assert httpx.delete(f"{server.url}/v1/videos/{long_job['id']}").status_code == 200
    deadline = time.monotonic() + 60
    while any(long_job["id"] in name for name in _job_files(jobs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(long_job["id"] in name for name in _job_files(jobs))
    # The engine is free again at once: the next job finishes.
    job = httpx.post(f"{server.url}/v1/videos", json=VIDEO).json()
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/v1/videos/{job['id']}").json()["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/v1/videos/{job['id']}").json()["status"] == "completed"


def test_warmup_compiles_before_serving(start_server, tiny_flux):
    """--warmup runs each shape once before /health says ready (on a GPU that is where torch.compile
    pays for each resolution and batch size; here it shows the shapes ran)."""
    server = start_server(tiny_flux, "--warmup", "16x16,32x16:2", env={"DIFFSERVE_LOG_LEVEL": "INFO"})
    log = server.output()
    assert "warm-up 16x16, batch 1" in log and "warm-up 32x16, batch 2" in log
    assert httpx.get(f"{server.url}/health").json()["status"] == "ready"


def test_a_bad_warmup_shape_is_one_line_and_exit_2(tiny_flux):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "diffserve.entrypoints.cli", "serve", tiny_flux, "--warmup", "big"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--warmup takes WIDTHxHEIGHT[:BATCH] items" in result.stderr
