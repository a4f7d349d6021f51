"""The image-server fixture the server tests share (Server and start_server live in tests/conftest.py)."""

import pytest


@pytest.fixture(scope="module")
def flux_server(start_server, tiny_flux):
    return start_server(tiny_flux, "--max-upload-mb", "1", "--max-n", "4", "--served-model-name", "tiny-flux")
