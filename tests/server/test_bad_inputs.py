"""Malformed requests get a 4xx in OpenAI's error shape, and the server keeps serving."""

import base64
import io

import httpx
import pytest
from PIL import Image

PNG = io.BytesIO()
Image.new("RGB", (8, 8), "red").save(PNG, format="PNG")
PNG = PNG.getvalue()
GEN = "/v1/images/generations"

CASES = [
    # (id, method, path, request kwargs, status)
    ("bad_json", "POST", GEN, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ("json_array", "POST", GEN, {"json": ["a fox"]}, 400),
    ("json_string", "POST", GEN, {"json": "a fox"}, 400),
    ("empty_body", "POST", GEN, {"content": b"", "headers": {"content-type": "application/json"}}, 400),
    ("missing_prompt", "POST", GEN, {"json": {"n": 1}}, 400),
    ("empty_prompt", "POST", GEN, {"json": {"prompt": ""}}, 400),
    ("prompt_number", "POST", GEN, {"json": {"prompt": 42}}, 400),
    ("prompt_null", "POST", GEN, {"json": {"prompt": None}}, 400),
    ("huge_prompt", "POST", GEN, {"json": {"prompt": "a" * 30000}}, 400),
    ("n_zero", "POST", GEN, {"json": {"prompt": "x", "n": 0}}, 400),
    ("n_too_large", "POST", GEN, {"json": {"prompt": "x", "n": 99}}, 400),
    ("n_string", "POST", GEN, {"json": {"prompt": "x", "n": "2"}}, 400),
    ("n_float", "POST", GEN, {"json": {"prompt": "x", "n": 1.5}}, 400),
    ("size_garbage", "POST", GEN, {"json": {"prompt": "x", "size": "big"}}, 400),
    ("size_huge", "POST", GEN, {"json": {"prompt": "x", "size": "100000x100000"}}, 400),
    ("size_zero", "POST", GEN, {"json": {"prompt": "x", "size": "0x64"}}, 400),
    ("size_not_multiple", "POST", GEN, {"json": {"prompt": "x", "size": "30x30", "num_inference_steps": 1}}, 400),
    ("size_negative", "POST", GEN, {"json": {"prompt": "x", "size": "-64x64"}}, 400),
    ("steps_zero", "POST", GEN, {"json": {"prompt": "x", "num_inference_steps": 0}}, 400),
    ("steps_negative", "POST", GEN, {"json": {"prompt": "x", "num_inference_steps": -5}}, 400),
    ("steps_huge", "POST", GEN, {"json": {"prompt": "x", "num_inference_steps": 10**9}}, 400),
    ("steps_string", "POST", GEN, {"json": {"prompt": "x", "num_inference_steps": "ten"}}, 400),
    ("guidance_string", "POST", GEN, {"json": {"prompt": "x", "guidance_scale": "high"}}, 400),
    ("guidance_negative", "POST", GEN, {"json": {"prompt": "x", "guidance_scale": -1}}, 400),
    ("guidance_bool", "POST", GEN, {"json": {"prompt": "x", "guidance_scale": True}}, 400),
    ("seed_negative", "POST", GEN, {"json": {"prompt": "x", "seed": -1}}, 400),
    ("seed_too_big", "POST", GEN, {"json": {"prompt": "x", "seed": 2**70}}, 400),
    ("unknown_field", "POST", GEN, {"json": {"prompt": "x", "strength_of_magic": 3}}, 400),
    ("response_format_url", "POST", GEN, {"json": {"prompt": "x", "response_format": "url"}}, 400),
    ("output_format_gif", "POST", GEN, {"json": {"prompt": "x", "output_format": "gif"}}, 400),
    ("compression_out_of_range", "POST", GEN, {"json": {"prompt": "x", "output_compression": 101}}, 400),
    ("negative_prompt_number", "POST", GEN, {"json": {"prompt": "x", "negative_prompt": 7}}, 400),
    ("unknown_model", "POST", GEN, {"json": {"prompt": "x", "model": "dall-e-3"}}, 404),
    ("oversized_body", "POST", GEN, {"json": {"prompt": "x", "pad": "y" * (2 * 1024 * 1024)}}, 413),
    ("prompt_list", "POST", GEN, {"json": {"prompt": ["a", "b"]}}, 400),
    ("wrong_method", "GET", GEN, {}, 405),
    ("unknown_endpoint", "POST", "/v1/images/variations", {"json": {"prompt": "x"}}, 404),
    ("edits_not_multipart", "POST", "/v1/images/edits", {"json": {"prompt": "x"}}, 400),
    ("edits_corrupt_multipart", "POST", "/v1/images/edits",
     {"content": b"--xx\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=xx"}}, 400),
    ("edits_two_images_for_flux", "POST", "/v1/images/edits",
     {"files": [("image[]", ("a.png", PNG, "image/png")), ("image[]", ("b.png", PNG, "image/png"))],
      "data": {"prompt": "x", "num_inference_steps": "2"}}, 400),
    ("edits_no_image", "POST", "/v1/images/edits", {"files": {"other": ("a.txt", b"x", "text/plain")},
                                                      "data": {"prompt": "x"}}, 400),
    ("edits_corrupt_image", "POST", "/v1/images/edits",
     {"files": {"image": ("a.png", b"\x89PNG broken", "image/png")}, "data": {"prompt": "x"}}, 400),
    ("edits_mask", "POST", "/v1/images/edits",
     {"files": {"image": ("a.png", PNG, "image/png"), "mask": ("m.png", PNG, "image/png")}, "data": {"prompt": "x"}}, 400),
    ("edits_strength_zero", "POST", "/v1/images/edits",
     {"files": {"image": ("a.png", PNG, "image/png")}, "data": {"prompt": "x", "strength": "0"}}, 400),
    ("edits_missing_prompt", "POST", "/v1/images/edits", {"files": {"image": ("a.png", PNG, "image/png")}}, 400),
    ("video_unknown_job", "GET", "/v1/videos/video_doesnotexist", {}, 400),
    ("video_on_image_model", "POST", "/v1/videos", {"json": {"prompt": "x"}}, 400),
    ("audio_on_image_model", "POST", "/v1/audio/generations", {"json": {"prompt": "rain"}}, 400),
    ("audio_bad_seconds", "POST", "/v1/audio/generations", {"json": {"prompt": "rain", "seconds": -3}}, 400),
    ("bad_b64_image_field", "POST", GEN, {"json": {"prompt": "x", "image": base64.b64encode(b"junk").decode()}}, 400),
]


@pytest.mark.parametrize("name, method, path, kwargs, status", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_a_4xx_with_error_json(flux_server, name, method, path, kwargs, status):
    r = httpx.request(method, f"{flux_server.url}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]


def test_server_is_healthy_after_the_bad_inputs(flux_server):
    assert len(CASES) >= 30
    for _, method, path, kwargs, _ in CASES:
        httpx.request(method, f"{flux_server.url}{path}", timeout=60, **kwargs)
    assert httpx.get(f"{flux_server.url}/health").status_code == 200
    r = httpx.post(f"{flux_server.url}{GEN}", timeout=60, json={"prompt": "ok", "size": "16x16", "num_inference_steps": 1})
    assert r.status_code == 200
    metrics = httpx.get(f"{flux_server.url}/metrics").text
    assert 'status="500"' not in metrics


def test_oversized_chunked_body_is_413(flux_server):
    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(f"{flux_server.url}{GEN}", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    assert httpx.get(f"{flux_server.url}/health").status_code == 200


MESSAGES = [
    # (id, request kwargs, expected param, text the message must contain)
    ("size_out_of_range", {"json": {"prompt": "x", "size": "100000x100000"}}, "size", "size 100000x100000 is out of range"),
    ("size_format", {"json": {"prompt": "x", "size": "big"}}, "size", "size must look like '1024x768'"),
    ("size_not_multiple", {"json": {"prompt": "x", "size": "30x30", "num_inference_steps": 1}}, "height",
     "height=30 is not supported by FluxPipeline: it must be a multiple of 4"),
    ("compression_out_of_range", {"json": {"prompt": "x", "output_compression": 101}}, "output_compression",
     "output_compression: Input should be less than or equal to 100"),
    ("json_without_content_type", {"content": b'{"prompt": "x"}'}, None,
     "this endpoint takes a JSON body with 'Content-Type: application/json' (got 'no content type')"),
    ("audio_on_image_model", {"json": {"prompt": "rain"}, "path": "/v1/audio/generations"}, "model",
     "/v1/audio/generations needs an audio model"),
]


@pytest.mark.parametrize("name, kwargs, param, text", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_errors_say_what_was_wrong_and_name_the_field(flux_server, name, kwargs, param, text):
    kwargs = dict(kwargs)
    path = kwargs.pop("path", GEN)
    r = httpx.post(f"{flux_server.url}{path}", timeout=60, **kwargs)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert text in error["message"] and "Value error" not in error["message"], error
    assert error["param"] == param
