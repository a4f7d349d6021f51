"""Throughput of the HTTP server with batching against one request per pipeline call, on the same
checkpoint in one run: N concurrent image requests, best of R bursts each.

    python benchmarks/bench_server_batching.py [--model DIR] [--requests 64] [--bursts 2] [--size 16x16]

Without --model a tiny random FLUX checkpoint is built (CPU-sized). Prints requests/s of each server
and the ratio; the speed-up comes from fewer, larger transformer calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import httpx

from diffserve.engine.multiproc_executor import get_free_port


def start(model: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = get_free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffserve.entrypoints.cli", "serve", model, "--port", str(port),
                             "--disable-progress-bar", "--uvicorn-log-level", "warning", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "DIFFSERVE_LOG_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server {' '.join(args)} did not start")


async def burst(url: str, count: int, size: str) -> float:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        start = time.monotonic()
        responses = await asyncio.gather(*[
            client.post(f"{url}/v1/images/generations",
                        json={"prompt": f"fox number {i}", "size": size, "num_inference_steps": 2, "seed": i})
            for i in range(count)
        ])
        elapsed = time.monotonic() - start
    if any(r.status_code != 200 for r in responses):
        raise RuntimeError(f"failed requests: {[r.status_code for r in responses if r.status_code != 200][:5]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--size", default="16x16")
    parser.add_argument("--max-batch-size", default="8")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from diffserve.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint("flux", tempfile.mkdtemp(prefix="bench_flux_"))
    servers = {
        "batched": start(model, "--max-batch-size", args.max_batch_size, "--batch-wait-ms", "20", "--max-queue", "512"),
        "one per call": start(model, "--max-batch-size", "1", "--max-queue", "512"),
    }
    try:
        best = {}
        for name, (_, url) in servers.items():
            asyncio.run(burst(url, 4, args.size))  # warm-up
        for _ in range(args.bursts):  # alternate: other load on the machine hits both alike
            for name, (_, url) in servers.items():
                elapsed = asyncio.run(burst(url, args.requests, args.size))
                best[name] = min(best.get(name, elapsed), elapsed)
        for name, elapsed in best.items():
            print(f"{name:>13}: {args.requests / elapsed:7.2f} requests/s ({elapsed:.2f} s for {args.requests})")
        print(f"batching speed-up: {best['one per call'] / best['batched']:.2f}x")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
