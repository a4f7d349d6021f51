"""/v1/images/edits on an editing model (tiny Qwen-Image-Edit-Plus): the official openai client with
several images per prompt, and input images checked against the model (count, mode, size, pixels,
the size they would be used at) with 400s that name `image`."""

import base64
import io

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.testing.conformance import sample_image as picture


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def edit_plus(tiny_checkpoint):
    return tiny_checkpoint("qwen-image-edit-plus")


@pytest.fixture(scope="module")
def edit_server(start_server, edit_plus):
    return start_server(edit_plus, "--served-model-name", "tiny-edit-plus")


def test_openai_client_edit_with_two_images_equals_offline(edit_server, edit_plus):
    """Two images (one RGBA, converted to RGB like offline) edited together; with size "auto" the last
    image (48x64) sizes the output at about 1024 x 1024 pixels: 896x1184."""
    first = picture(64, 48, 0)
    second = picture(48, 64, 1).convert("RGBA")
    client = OpenAI(base_url=f"{edit_server.url}/v1", api_key="unused")
    resp = client.images.edit(
        model="tiny-edit-plus",
        image=[("a.png", png(first), "image/png"), ("b.png", png(second), "image/png")],
        prompt="put the cat of picture 1 into picture 2",
        extra_body={"num_inference_steps": 2, "seed": 4, "negative_prompt": "blurry"},
    )
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json))))
    assert served.shape == (1184, 896, 3)
    with Omni(edit_plus, dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        offline = omni.generate(
            {"prompt": "put the cat of picture 1 into picture 2", "image": [first, second], "negative_prompt": "blurry"},
            OmniDiffusionSamplingParams(num_inference_steps=2, seed=4),
        )
    np.testing.assert_array_equal(served, np.asarray(offline[0].images[0]))
    assert resp.size == "896x1184" and resp.model_extra["seed"] == 4


def _edit(server, images: list[bytes], **fields):
    files = [("image[]", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    data = {"prompt": "make it blue", "num_inference_steps": "1", "size": "128x96", **fields}
    return httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, timeout=120)


SMALL = png(picture(64, 48, 0))
BAD_IMAGES = [
    ("four_images", [SMALL] * 4, "takes at most 3 input image(s) per prompt, got 4"),
    ("sixteen_bit", [png(Image.new("I;16", (64, 48)))], "mode 'I;16' (more than 8 bits per channel) is not supported"),
    ("side_too_long", [png(Image.new("RGB", (4100, 8)))], "input image is 4100x8; each side must be between 1 and 4096"),
    ("too_many_pixels", [png(Image.new("RGB", (4096, 4097)))], "image is 4096x4097; at most 16777216 pixels"),
    # At about 1024 x 1024 pixels a 300:1 image would be 17728 pixels wide.
    ("used_at_too_wide", [png(Image.new("RGB", (3000, 10)))], "would be used at 17728x64; its sides must be between"),
    ("not_an_image", [b"GIF89a-but-not-really"], "image is not a readable image"),
    ("empty_file", [b""], "image is empty"),
]


@pytest.mark.parametrize("images, message", [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_bad_input_images_are_400s_naming_image(edit_server, images, message):
    r = _edit(edit_server, images)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == "image"


def test_edit_needs_an_image_and_the_server_keeps_serving(edit_server):
    r = httpx.post(f"{edit_server.url}/v1/images/edits", files={"other": ("a.txt", b"x", "text/plain")},
                   data={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(f"{edit_server.url}/v1/images/generations", json={"prompt": "a cat", "size": "128x96"}, timeout=60)
    assert r.status_code == 400 and "needs an input image" in r.json()["error"]["message"]
    ok = _edit(edit_server, [SMALL, png(Image.new("L", (64, 48), 128))])  # grayscale: converted to RGB
    assert ok.status_code == 200, ok.text
    assert Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"]))).size == (128, 96)
