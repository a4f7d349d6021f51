"""/v1/videos: asynchronous jobs with progress, MP4 content, listing, deletion, and persistence."""

import io
import time

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from diffserve.media import decode_video

BODY = {"prompt": "a cat surfing", "size": "32x32", "num_frames": 5, "num_inference_steps": 3, "seed": 3}


def wait_done(url: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/videos/{job_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jobs"))


@pytest.fixture(scope="module")
def video_server(start_server, tiny_checkpoint, jobs_dir):
    return start_server(tiny_checkpoint("wan2.1-t2v"), "--jobs-dir", jobs_dir, "--served-model-name", "tiny-wan")


def test_job_lifecycle_with_openai_client(video_server):
    client = OpenAI(base_url=f"{video_server.url}/v1", api_key="unused")
    job = client.videos.create(prompt=BODY["prompt"], size="32x32",
                               extra_body={k: BODY[k] for k in ("num_frames", "num_inference_steps", "seed")})
    assert job.status in ("queued", "in_progress", "completed") and job.model == "tiny-wan"
    done = wait_done(video_server.url, job.id)
    assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"]
    content = httpx.get(f"{video_server.url}/v1/videos/{job.id}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    frames, fps = decode_video(content.content)
    assert frames.shape == (5, 32, 32, 3) and fps == 16
    listed = httpx.get(f"{video_server.url}/v1/videos").json()
    assert job.id in [j["id"] for j in listed["data"]]


def test_progress_is_reported_while_running(video_server):
    job = httpx.post(f"{video_server.url}/v1/videos", json={**BODY, "num_inference_steps": 40}).json()
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = httpx.get(f"{video_server.url}/v1/videos/{job['id']}").json()
        seen.add(state["progress"])
        if state["status"] == "completed":
            break
        time.sleep(0.02)
    assert state["status"] == "completed"
    assert any(0 < p < 100 for p in seen), seen  # real steps-done progress, not just 0 then 100


def test_unknown_job_and_not_ready_and_delete(video_server):
    assert httpx.get(f"{video_server.url}/v1/videos/video_nope").status_code == 404
    assert httpx.get(f"{video_server.url}/v1/videos/video_nope/content").status_code == 404
    assert httpx.delete(f"{video_server.url}/v1/videos/video_nope").status_code == 404
    job = httpx.post(f"{video_server.url}/v1/videos", json={**BODY, "num_inference_steps": 200}).json()
    early = httpx.get(f"{video_server.url}/v1/videos/{job['id']}/content")
    assert early.status_code == 409 and "not ready" in early.json()["error"]["message"]
    deleted = httpx.delete(f"{video_server.url}/v1/videos/{job['id']}").json()
    assert deleted == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert httpx.get(f"{video_server.url}/v1/videos/{job['id']}").status_code == 404


@pytest.mark.parametrize("body, message", [
    ({**BODY, "num_frames": 8}, "num_frames=8 is not supported"),
    ({**BODY, "size": "30x30"}, "multiple of 16"),
    ({**BODY, "seconds": "forever"}, "seconds must be a number"),
    ({"size": "32x32"}, "prompt"),
])
def test_invalid_video_requests(video_server, body, message):
    r = httpx.post(f"{video_server.url}/v1/videos", json=body)  # checked at submission, before a job exists
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_finished_video_survives_a_restart(start_server, tiny_checkpoint, jobs_dir, video_server):
    job = httpx.post(f"{video_server.url}/v1/videos", json=BODY).json()
    assert wait_done(video_server.url, job["id"])["status"] == "completed"
    video_server.stop()
    restarted = start_server(tiny_checkpoint("wan2.1-t2v"), "--jobs-dir", jobs_dir, "--served-model-name", "tiny-wan")
    again = httpx.get(f"{restarted.url}/v1/videos/{job['id']}").json()
    assert again["status"] == "completed"
    frames, _ = decode_video(httpx.get(f"{restarted.url}/v1/videos/{job['id']}/content").content)
    assert frames.shape == (5, 32, 32, 3)


def test_image_to_video_with_input_reference(start_server, tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint("wan2.1-i2v"), "--jobs-dir", str(tmp_path))
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "orange").save(png, format="PNG")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    job = client.videos.create(prompt="a cat surfing", size="32x32", input_reference=("first.png", png.getvalue(), "image/png"),
                               extra_body={"num_frames": 5, "num_inference_steps": 2, "seed": 1})
    done = wait_done(server.url, job.id)
    assert done["status"] == "completed", done
    frames, _ = decode_video(httpx.get(f"{server.url}/v1/videos/{job.id}/content").content)
    assert frames.shape == (5, 32, 32, 3)
    bad = httpx.post(f"{server.url}/v1/videos", files={"input_reference": ("x.png", b"not an image", "image/png")},
                     data={"prompt": "x"})
    assert bad.status_code == 400 and "not a readable image" in bad.json()["error"]["message"]
