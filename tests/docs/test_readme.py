"""README.md's commands and snippets work as written (with this environment's interpreter in place of
`.venv/bin/`): the CLI lines, the Python block, and the server block with the openai client."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from diffserve.engine.multiproc_executor import get_free_port

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
BIN = Path(sys.executable).parent


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def _local(command: str) -> str:
    """A README command with `.venv/bin/` pointing at the running interpreter's environment."""
    return command.replace(".venv/bin/", f"{BIN}/")


def test_the_first_command_after_setup_draws_the_image(tmp_path):
    setup_and_generate = _blocks("bash")[0].strip()
    assert setup_and_generate.startswith("bash scripts/setup.sh && .venv/bin/diffserve generate")
    generate = _local(setup_and_generate.split("&&", 1)[1].strip())
    result = subprocess.run(generate, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "shapes.png").size == (64, 64)


def test_the_test_command_is_the_ci_command():
    tests = _blocks("bash")[1].strip()
    assert tests.startswith("bash scripts/setup.sh && .venv/bin/python -m pytest")
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert tests.split("&& ", 1)[1] in ci


def test_the_command_line_block_runs(tmp_path):
    lines = [line.split("#")[0].strip() for line in _blocks("bash")[2].splitlines()]
    for line in filter(None, lines):
        if "/models/" in line:  # a real checkpoint the reader has, not this machine
            continue
        result = subprocess.run(_local(line), shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (line, result.stderr[-2000:])
    assert Image.open(tmp_path / "triangle.png").size == (64, 64)


def test_the_python_block_runs(tmp_path):
    result = subprocess.run([sys.executable, "-c", _blocks("python")[0]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "circle.png").size == (64, 64)


def test_the_server_block_serves_the_openai_client(tmp_path):
    port = get_free_port()
    serve = _local(_blocks("bash")[3].split("#")[0].strip()).replace("--port 8000", f"--port {port}")
    server = subprocess.Popen(serve, shell=True, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "DIFFSERVE_DISABLE_PROGRESS_BAR": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = _blocks("python")[1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        result = subprocess.run([sys.executable, "-c", client], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert Image.open(tmp_path / "served.png").size == (64, 64)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
