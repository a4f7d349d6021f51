import pytest


@pytest.fixture(scope="session")
def tiny_demo_dit(tiny_checkpoint) -> str:
    return tiny_checkpoint("demo-dit")


@pytest.fixture(scope="session")
def demo_omni(tiny_demo_dit):
    from diffserve import Omni

    with Omni(tiny_demo_dit, dtype="float32", device="cpu", max_batch_size=4) as omni:
        yield omni
