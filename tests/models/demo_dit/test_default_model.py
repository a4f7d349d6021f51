"""The built-in demo model is the default of `diffserve generate` and ships inside the package."""

import os

import pytest
from PIL import Image

from diffserve.assets import DEMO_MODEL_DIR, default_model_path
from diffserve.entrypoints.cli import main

needs_model = pytest.mark.skipif(
    not os.path.isdir(DEMO_MODEL_DIR), reason=f"the demo model is not trained yet ({DEMO_MODEL_DIR} is absent)"
)


def test_missing_demo_model_is_a_clear_error(monkeypatch, capsys):
    import diffserve.assets as assets

    monkeypatch.setattr(assets, "DEMO_MODEL_DIR", "/nonexistent/demo_model")
    with pytest.raises(ValueError, match="built-in demo model is not in this install"):
        default_model_path()
    assert main(["generate", "a red circle", "-o", "/tmp/never.png"]) == 2
    assert "pass --model" in capsys.readouterr().err.lower()


def test_pyproject_ships_the_demo_model_as_package_data():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    text = open(os.path.join(root, "pyproject.toml")).read()
    assert '"assets/demo_model/*/*.safetensors"' in text and '"assets/demo_model/*.json"' in text


@needs_model
def test_shipped_model_is_small_and_complete():
    from diffserve.registry import check_component_folders, read_model_index

    index = read_model_index(DEMO_MODEL_DIR)
    assert index["_class_name"] == "DiffservePixelDiTPipeline"
    check_component_folders(DEMO_MODEL_DIR, index)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(DEMO_MODEL_DIR) for f in files)
    assert total <= 16 * 2**20, f"{total / 2**20:.1f} MiB"


@needs_model
def test_generate_without_model_uses_the_demo_model(tmp_path, capsys):
    out = tmp_path / "shapes.png"
    assert (
        main(["generate", "a red circle above a blue square", "-o", str(out), "--seed", "0", "--disable-progress-bar"])
        == 0
    )
    assert Image.open(out).size == (64, 64)
    assert "seed 0" in capsys.readouterr().out
