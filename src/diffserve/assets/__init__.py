"""Files shipped inside the package. `demo_model/` holds the built-in demo model (a checkpoint folder
written by scripts/train_demo_model.py), used by `diffserve generate` when no --model is given."""

from __future__ import annotations

import os

DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def demo_model_available() -> bool:
    return os.path.isfile(os.path.join(DEMO_MODEL_DIR, "model_index.json"))


def default_model_path() -> str:
    """The built-in demo model's folder; a ValueError saying what to do if this install lacks it."""
    if not demo_model_available():
        raise ValueError(
            f"no model given and the built-in demo model is not in this install ({DEMO_MODEL_DIR} has no "
            "model_index.json). Pass --model DIR_OR_HUB_ID, or train the demo model with "
            "scripts/train_demo_model.py --out DIR and copy DIR there."
        )
    return DEMO_MODEL_DIR
