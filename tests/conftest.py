import os
import subprocess
import sys
import time

import pytest
import torch

from diffserve.engine.multiproc_executor import get_free_port

os.environ.setdefault("DIFFSERVE_DISABLE_PROGRESS_BAR", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist each worker gets its share of the cores (and so do the servers and CLIs it
# starts, through OMP_NUM_THREADS): oversubscribed threads spin and slow every process many times over.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Build (once per session) and return the path of a tiny checkpoint: tiny_checkpoint("flux")."""
    from diffserve.testing import make_tiny_checkpoint

    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = make_tiny_checkpoint(arch, str(tmp_path_factory.mktemp(arch)))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_flux(tiny_checkpoint) -> str:
    return tiny_checkpoint("flux")


@pytest.fixture(scope="session")
def flux_omni(tiny_flux):
    from diffserve import Omni

    with Omni(tiny_flux, dtype="float32", device="cpu", max_batch_size=4) as omni:
        yield omni


# -- servers started as users start them (`diffserve serve`), one set per test module ----------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (tests/ is in it)


def import_benchmark(name: str):
    """A script of benchmarks/ as a module (they import each other by bare name), for tests of it;
    sys.path is restored afterwards."""
    import importlib

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(os.path.join(REPO, "benchmarks"))
        return importlib.import_module(name)


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return children


class Server:
    def __init__(self, model: str, *args: str, env: dict | None = None):
        self.port = get_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "diffserve.entrypoints.cli", "serve", model, "--port", str(self.port),
               "--dtype", "float32", "--device", "cpu", "--disable-progress-bar", "--uvicorn-log-level", "warning",
               *args]
        env = {**os.environ, "DIFFSERVE_LOG_LEVEL": "WARNING", **(env or {})}
        # Logs go to a file: a pipe nobody reads would block the server once full.
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"diffserve-server-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        import httpx  # here, not at the top: the GPU machine runs the gpu tests without it

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

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
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def start_server():
    """Start servers for one test module; all of them stop when the module's tests are done."""
    servers = []

    def start(model: str, *args: str, env: dict | None = None) -> Server:
        server = Server(model, *args, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
