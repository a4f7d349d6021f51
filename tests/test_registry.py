import json
import subprocess
import sys

import pytest

from diffserve.config import OmniDiffusionConfig
from diffserve.registry import ModelResolutionError, resolve_model, supported_models


def _write_index(path, index):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps(index))
    return str(path)


def test_flux_is_registered():
    assert "FluxPipeline" in supported_models()


def test_resolve_fills_class_and_path(tiny_flux):
    cfg = OmniDiffusionConfig(model=tiny_flux)
    resolve_model(cfg)
    assert cfg.model_class_name == "FluxPipeline"
    assert cfg.model_config["_class_name"] == "FluxPipeline"


def test_unknown_pipeline_class_lists_supported(tmp_path):
    path = _write_index(tmp_path / "m", {"_class_name": "NoSuchPipeline"})
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(OmniDiffusionConfig(model=path))
    assert "'NoSuchPipeline'" in str(err.value) and "FluxPipeline" in str(err.value)


def test_missing_model_index_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolutionError, match="has no model_index.json"):
        resolve_model(OmniDiffusionConfig(model=str(tmp_path / "empty")))


def test_invalid_model_index_json(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text("{not json")
    with pytest.raises(ModelResolutionError, match="not valid JSON"):
        resolve_model(OmniDiffusionConfig(model=str(tmp_path / "bad")))


def test_missing_component_folder_is_named(tmp_path):
    path = _write_index(
        tmp_path / "m",
        {"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None]},
    )
    with pytest.raises(ModelResolutionError, match="component 'vae'.*missing"):
        resolve_model(OmniDiffusionConfig(model=path))


def test_hub_id_offline_fails_clearly(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(OmniDiffusionConfig(model="black-forest-labs/FLUX.1-dev"))
    assert "not a local folder" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_import_diffserve_loads_no_model_family_or_torch():
    code = (
        "import sys, diffserve; "
        "assert not any(m.startswith('diffserve.models.') for m in sys.modules), sorted(sys.modules); "
        "assert 'torch' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
