#!/usr/bin/env bash
# Create .venv with a CPU build of torch and diffserve (editable) plus test tools. Safe to re-run.
# GPU users: install diffserve into an environment that already has CUDA torch (`pip install -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU build first: the package's own torch range would otherwise pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
