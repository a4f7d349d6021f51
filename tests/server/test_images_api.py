"""/v1/images/generations with the official openai client and with httpx."""

import base64
import io

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_png_equals_offline_omni(flux_server, tiny_flux):
    client = OpenAI(base_url=f"{flux_server.url}/v1", api_key="unused")
    resp = client.images.generate(model="tiny-flux", prompt="a red fox in snow", n=2, size="48x32",
                                  extra_body={"num_inference_steps": 3, "seed": 11, "guidance_scale": 3.5})
    served = [np.asarray(decode(d.b64_json)) for d in resp.data]
    assert len(served) == 2 and served[0].shape == (32, 48, 3)
    with Omni(tiny_flux, dtype="float32", device="cpu") as omni:
        offline = omni.generate("a red fox in snow", OmniDiffusionSamplingParams(
            height=32, width=48, num_inference_steps=3, seed=11, guidance_scale=3.5, num_outputs_per_prompt=2))
    for png, image in zip(served, offline[0].images):
        np.testing.assert_array_equal(png, np.asarray(image))
    assert resp.model_extra["seed"] == 11 and resp.size == "48x32"


def test_true_cfg_and_formats_with_httpx(flux_server):
    for fmt, pil_format in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        r = httpx.post(f"{flux_server.url}/v1/images/generations", timeout=60, json={
            "prompt": "a blue car", "size": "32x32", "output_format": fmt, "num_inference_steps": 2,
            "negative_prompt": "blurry", "true_cfg_scale": 3.0, "seed": 1})
        assert r.status_code == 200, r.text
        image = decode(r.json()["data"][0]["b64_json"])
        assert image.format == pil_format and image.size == (32, 32)


def test_unseeded_request_reports_a_seed(flux_server):
    r = httpx.post(f"{flux_server.url}/v1/images/generations", timeout=60,
                   json={"prompt": "x", "size": "16x16", "num_inference_steps": 1})
    assert r.status_code == 200 and isinstance(r.json()["seed"], int)


def test_models_health_and_metrics(flux_server):
    models = httpx.get(f"{flux_server.url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny-flux" and models["data"][0]["modality"] == "image"
    assert httpx.get(f"{flux_server.url}/v1/models/tiny-flux").status_code == 200
    assert httpx.get(f"{flux_server.url}/v1/models/other").status_code == 404
    assert httpx.get(f"{flux_server.url}/health").json()["status"] in ("ready", "busy")
    text = httpx.get(f"{flux_server.url}/metrics").text
    for name in ("diffserve_requests_total", "diffserve_queue_depth", "diffserve_batch_size",
                 "diffserve_denoise_step_seconds", "diffserve_request_seconds", "diffserve_outputs_total",
                 "diffserve_running_requests", "diffserve_queue_wait_seconds", "diffserve_denoise_steps_completed",
                 'diffserve_engine_state{state="ready"}', "diffserve_process_resident_bytes"):
        assert name in text
    # Labels are route templates, whatever paths clients send.
    httpx.get(f"{flux_server.url}/v1/videos/made-up-id-123")
    assert "made-up-id-123" not in httpx.get(f"{flux_server.url}/metrics").text


def test_wrong_endpoints_for_an_image_model(flux_server):
    client = OpenAI(base_url=f"{flux_server.url}/v1", api_key="unused")
    with pytest.raises(Exception) as err:
        client.videos.create(prompt="a cat surfing")
    assert getattr(err.value, "status_code", None) == 400
    r = httpx.post(f"{flux_server.url}/v1/audio/generations", json={"prompt": "rain"})
    assert r.status_code == 400 and "needs an audio model" in r.json()["error"]["message"]


def test_api_key(start_server, tiny_flux):
    server = start_server(tiny_flux, "--api-key", "s3cret")
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    bad = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    client = OpenAI(base_url=f"{server.url}/v1", api_key="s3cret")
    resp = client.images.generate(prompt="x", size="16x16", extra_body={"num_inference_steps": 1})
    assert len(resp.data) == 1


def test_openai_client_edit_equals_offline_image_to_image(flux_server, tiny_flux):
    from diffserve.testing.conformance import sample_image

    source = sample_image(48, 32, 0)
    png = io.BytesIO()
    source.save(png, format="PNG")
    client = OpenAI(base_url=f"{flux_server.url}/v1", api_key="unused")
    resp = client.images.edit(image=("in.png", png.getvalue(), "image/png"), prompt="a red fox", n=1,
                              extra_body={"num_inference_steps": 4, "seed": 2, "strength": 0.5})
    served = np.asarray(decode(resp.data[0].b64_json))
    assert served.shape == (32, 48, 3)  # the input's size by default
    with Omni(tiny_flux, dtype="float32", device="cpu") as omni:
        offline = omni.generate({"prompt": "a red fox", "image": Image.open(io.BytesIO(png.getvalue()))},
                                OmniDiffusionSamplingParams(num_inference_steps=4, seed=2, strength=0.5))
    np.testing.assert_array_equal(served, np.asarray(offline[0].images[0]))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_concurrent_edits_of_two_sizes_equal_each_alone(flux_server, tiny_flux):
    """Two edits arriving together with different input sizes and no size: each gets its own size
    and the image it gets alone (the scheduler's key keeps them apart)."""
    import concurrent.futures

    from diffserve.testing.conformance import sample_image

    sources = [sample_image(48, 32, 0), sample_image(32, 64, 1)]
    client = OpenAI(base_url=f"{flux_server.url}/v1", api_key="unused")

    def edit(i):
        return client.images.edit(image=("in.png", _png(sources[i]), "image/png"), prompt="a red fox",
                                  extra_body={"num_inference_steps": 3, "seed": i, "strength": 0.6})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        served = [np.asarray(decode(r.data[0].b64_json)) for r in pool.map(edit, range(2))]
    with Omni(tiny_flux, dtype="float32", device="cpu") as omni:
        for i, source in enumerate(sources):
            alone = omni.generate({"prompt": "a red fox", "image": Image.open(io.BytesIO(_png(source)))},
                                  OmniDiffusionSamplingParams(num_inference_steps=3, seed=i, strength=0.6))
            np.testing.assert_array_equal(served[i], np.asarray(alone[0].images[0]))
    assert [s.shape for s in served] == [(32, 48, 3), (64, 32, 3)]


def test_a_parameter_the_model_does_not_use_is_a_400_naming_it(flux_server):
    r = httpx.post(f"{flux_server.url}/v1/images/generations", timeout=60,
                   json={"prompt": "a fox", "strength": 0.5, "size": "16x16"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "strength" and "strength is used only with an input image" in error["message"]
