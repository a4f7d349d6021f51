import os

import pytest
import torch

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
