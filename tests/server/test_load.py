"""Batching under concurrent load, and memory under many sequential requests."""

import asyncio
import re
import time

import httpx
import pytest

BODY = {"prompt": "a red fox", "size": "16x16", "num_inference_steps": 2, "output_format": "png"}


async def _burst(url: str, count: int) -> tuple[float, list[int]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        start = time.monotonic()
        responses = await asyncio.gather(*[
            client.post(f"{url}/v1/images/generations", json={**BODY, "seed": i, "prompt": f"fox number {i}"})
            for i in range(count)
        ])
        return time.monotonic() - start, [r.status_code for r in responses]


def _batch_histogram(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    count = float(re.search(r"^diffserve_batch_size_count (\S+)$", text, re.M).group(1))
    single = float(re.search(r'^diffserve_batch_size_bucket\{le="1.0"\} (\S+)$', text, re.M).group(1))
    return count, single


def test_concurrent_requests_are_batched(start_server, tiny_flux):
    """64 concurrent requests all succeed, and some pipeline calls carry several prompts (the speed
    this buys is measured by benchmarks/bench_server_batching.py, not asserted here)."""
    server = start_server(tiny_flux, "--max-batch-size", "8", "--batch-wait-ms", "20", "--max-queue", "128")
    _, codes = asyncio.run(_burst(server.url, 64))
    assert codes == [200] * 64
    batches, single = _batch_histogram(server.url)
    assert single < batches  # some pipeline calls carried more than one prompt


def test_full_queue_answers_429(start_server, tiny_flux):
    server = start_server(tiny_flux, "--max-batch-size", "1", "--max-queue", "2")
    _, codes = asyncio.run(_burst(server.url, 16))
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.slow  # 530 requests: a soak test
def test_sequential_requests_do_not_grow_memory(flux_server):
    body = {"prompt": "a fox", "size": "16x16", "num_inference_steps": 1}
    with httpx.Client(timeout=60) as client:
        for i in range(30):  # warm-up: allocator pools, lazy imports
            assert client.post(f"{flux_server.url}/v1/images/generations", json={**body, "seed": i}).status_code == 200
        before = flux_server.rss_bytes()
        for i in range(500):
            assert client.post(f"{flux_server.url}/v1/images/generations", json={**body, "seed": i}).status_code == 200
        after = flux_server.rss_bytes()
    growth_mb = (after - before) / 2**20
    print(f"RSS growth over 500 requests: {growth_mb:.1f} MiB")
    assert growth_mb < 25
