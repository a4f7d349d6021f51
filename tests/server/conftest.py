"""Start the real server (`diffserve serve`, uvicorn on 127.0.0.1) on a tiny checkpoint."""

import os
import subprocess
import sys
import time

import httpx
import pytest

from diffserve.engine.multiproc_executor import get_free_port


class Server:
    def __init__(self, model: str, *args: str):
        self.port = get_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "diffserve.entrypoints.cli", "serve", model, "--port", str(self.port),
               "--dtype", "float32", "--device", "cpu", "--disable-progress-bar", "--uvicorn-log-level", "warning",
               *args]
        env = {**os.environ, "DIFFSERVE_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def start_server():
    """Start servers for one test module; all of them stop when the module's tests are done."""
    servers = []

    def start(model: str, *args: str) -> Server:
        server = Server(model, *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def flux_server(start_server, tiny_flux):
    return start_server(tiny_flux, "--max-upload-mb", "1", "--max-n", "4", "--served-model-name", "tiny-flux")
