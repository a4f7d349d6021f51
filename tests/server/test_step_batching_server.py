"""`diffserve serve --batching step`: concurrent requests of different step counts are served through
step-level batching, each image equal to the request run alone offline, and /metrics counts the steps."""

import asyncio
import base64
import io

import httpx
import numpy as np
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams

PARAMS = ("num_inference_steps", "seed", "guidance_scale")


def test_concurrent_requests_are_step_batched_and_equal_each_alone(start_server, tiny_flux):
    step = start_server(tiny_flux, "--batching", "step", "--step-max-wait", "2", "--step-preemption")
    bodies = [{"prompt": "a red fox", "size": "32x32", "num_inference_steps": 3, "seed": 1, "guidance_scale": 3.5},
              {"prompt": "a blue car", "size": "32x32", "num_inference_steps": 2, "seed": 2, "guidance_scale": 2.0}]

    async def generate_all(url):
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(f"{url}/v1/images/generations", json=body)
                                               for body in bodies))
        assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
                for r in responses]

    served = asyncio.run(generate_all(step.url))
    metrics = httpx.get(f"{step.url}/metrics").text
    with Omni(tiny_flux, dtype="float32", device="cpu") as omni:  # request-level, each alone
        for image, body in zip(served, bodies):
            params = OmniDiffusionSamplingParams(height=32, width=32, **{k: body[k] for k in PARAMS})
            expected = np.asarray(omni.generate(body["prompt"], params)[0].images[0])
            # 8-bit pixels: the larger batch's fp32 rounding moves one by at most one level
            assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    assert 'diffserve_step_batch_samples_count{replica="0"}' in metrics
    assert 'diffserve_replica_step_preemptions{replica="0"} 0.0' in metrics
