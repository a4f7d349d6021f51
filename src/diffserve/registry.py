"""Model registry, keyed by the `_class_name` in a checkpoint's model_index.json.

Nothing is imported until a model is resolved, so `import diffserve` loads no model family. Models
outside the package join with `register_model("MyPipeline", "my_package.pipeline:MyPipeline")`; the
resolved import path travels in the config, so spawned worker processes find the class too.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch.nn as nn

    from diffserve.config import OmniDiffusionConfig

logger = logging.getLogger(__name__)

# _class_name -> (folder under diffserve/models, module file, class name)
_DIFFUSION_MODELS: dict[str, tuple[str, str, str]] = {
    "FluxPipeline": ("flux", "pipeline_flux", "FluxPipeline"),
    "FluxKontextPipeline": ("flux", "pipeline_flux_kontext", "FluxKontextPipeline"),
    "StableDiffusion3Pipeline": ("sd3", "pipeline_sd3", "StableDiffusion3Pipeline"),
    "WanPipeline": ("wan", "pipeline_wan", "WanPipeline"),
    "WanImageToVideoPipeline": ("wan", "pipeline_wan_i2v", "WanImageToVideoPipeline"),
    "DiffservePixelDiTPipeline": ("demo_dit", "pipeline_demo_dit", "DiffservePixelDiTPipeline"),
    "StableAudioPipeline": ("stable_audio", "pipeline_stable_audio", "StableAudioPipeline"),
    "QwenImagePipeline": ("qwen_image", "pipeline_qwen_image", "QwenImagePipeline"),
    "QwenImageEditPipeline": ("qwen_image", "pipeline_qwen_image_edit", "QwenImageEditPipeline"),
    "QwenImageEditPlusPipeline": ("qwen_image", "pipeline_qwen_image_edit", "QwenImageEditPlusPipeline"),
}

# _class_name -> "module.path:ClassName", for models registered at runtime (register_model).
_EXTERNAL_MODELS: dict[str, str] = {}

# _class_name -> name of a factory in the pipeline module: factory(od_config) -> callable. A pipeline
# without a post-process factory gets its modality's (diffserve.models.outputs.POST_PROCESS).
_DIFFUSION_PRE_PROCESS_FUNCS: dict[str, str] = {}
_DIFFUSION_POST_PROCESS_FUNCS: dict[str, str] = {}

MODEL_INDEX = "model_index.json"


class ModelResolutionError(ValueError):
    """The model path, its model_index.json or its pipeline class cannot be used."""


_plugins_loaded = False


def load_plugins() -> None:
    """Import the modules named by DIFFSERVE_PLUGINS (once): they register models of their own."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from diffserve.config import ENV_PLUGINS

    for name in ENV_PLUGINS:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ModelResolutionError(f"DIFFSERVE_PLUGINS names {name!r}, which cannot be imported: {exc}") from exc


def supported_models() -> list[str]:
    load_plugins()
    return sorted({*_DIFFUSION_MODELS, *_EXTERNAL_MODELS})


def register_model(class_name: str, import_path: str) -> None:
    """Serve checkpoints whose model_index.json `_class_name` is `class_name` with the pipeline at
    `import_path` ("package.module:ClassName"), imported lazily."""
    module, sep, attr = import_path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"import_path must look like 'package.module:ClassName', got {import_path!r}")
    if class_name in _DIFFUSION_MODELS:
        raise ValueError(f"{class_name!r} is a built-in pipeline; register the model under another _class_name")
    _EXTERNAL_MODELS[class_name] = import_path


def pipeline_import_path(class_name: str) -> str:
    """"module:ClassName" of a registered pipeline class, or ModelResolutionError listing the supported ones."""
    if class_name in _DIFFUSION_MODELS:
        folder, module, attr = _DIFFUSION_MODELS[class_name]
        return f"diffserve.models.{folder}.{module}:{attr}"
    if class_name in _EXTERNAL_MODELS:
        return _EXTERNAL_MODELS[class_name]
    raise ModelResolutionError(
        f"pipeline class {class_name!r} is not supported. Supported: {', '.join(supported_models())}"
    )


# The name that stands for the built-in demo model (a local folder of that name wins).
DEMO_MODEL = "demo"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local folder as is; "demo" the built-in demo model; anything else a hub id fetched with
    snapshot_download."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    if os.path.exists(model):
        raise ModelResolutionError(f"model path {model!r} is a file; expected a folder with {MODEL_INDEX}")
    if model == DEMO_MODEL:
        from diffserve.assets import default_model_path

        return default_model_path()
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise ModelResolutionError(
            f"model folder {model!r} does not exist (and it is not a Hugging Face hub id such as "
            "'black-forest-labs/FLUX.1-dev')"
        )
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, revision=revision)
    except Exception as exc:  # network, auth, offline mode: all end the same way for the user
        raise ModelResolutionError(
            f"model {model!r} is not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {exc}). Pass a local folder in the diffusers layout, or check the hub "
            f"id, your network and HF_HUB_OFFLINE."
        ) from exc


def read_model_index(path: str) -> dict[str, Any]:
    index_path = os.path.join(path, MODEL_INDEX)
    if not os.path.isfile(index_path):
        raise ModelResolutionError(
            f"{path} has no {MODEL_INDEX}; diffserve loads checkpoints in the diffusers layout "
            f"(model_index.json plus one subfolder per component)"
        )
    try:
        with open(index_path) as f:
            index = json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelResolutionError(f"{index_path} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ModelResolutionError(f"{index_path} has no '_class_name' string naming the pipeline class")
    return index


def check_component_folders(path: str, index: dict[str, Any]) -> None:
    """Every component model_index.json names (with a library and class) must have its folder."""
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2:
            continue
        if spec[0] is None or spec[1] is None:  # optional component left out
            continue
        if not os.path.isdir(os.path.join(path, name)):
            raise ModelResolutionError(
                f"{MODEL_INDEX} lists component {name!r} ({spec[0]}.{spec[1]}) but the folder "
                f"{os.path.join(path, name)} is missing"
            )


# The pipeline that serves any diffusers pipeline class through the same engine (backend "diffusers").
ADAPTER_IMPORT_PATH = "diffserve.models.diffusers_adapter.pipeline_adapter:DiffusersAdapterPipeline"


def diffusers_pipeline_class(class_name: str):
    """diffusers' pipeline class of that name, or None (diffusers missing, or no such pipeline)."""
    try:
        import diffusers
        from diffusers import DiffusionPipeline

        cls = getattr(diffusers, class_name, None)
    except (ImportError, RuntimeError):  # diffusers' lazy imports raise RuntimeError for a broken extra
        return None
    return cls if isinstance(cls, type) and issubclass(cls, DiffusionPipeline) else None


def choose_backend(class_name: str, backend: str, index_path: str) -> str:
    """"native" or "diffusers" for a checkpoint's pipeline class under the configured backend.

    A native pipeline is never replaced by the adapter unless backend="diffusers" asks for it."""
    native = class_name in _DIFFUSION_MODELS or class_name in _EXTERNAL_MODELS
    if backend == "native" or (backend == "auto" and native):
        if not native:
            raise ModelResolutionError(
                f"pipeline class {class_name!r} (from {index_path}) has no native diffserve pipeline "
                f"(backend='native'). Native: {', '.join(supported_models())}; backend='auto' or 'diffusers' "
                "serves other diffusers pipelines through the adapter"
            )
        return "native"
    if diffusers_pipeline_class(class_name) is not None:
        return "diffusers"
    if backend == "diffusers":
        raise ModelResolutionError(
            f"backend='diffusers' needs diffusers' pipeline class {class_name!r} (from {index_path}), which the "
            "installed diffusers does not have"
        )
    raise ModelResolutionError(
        f"pipeline class {class_name!r} (from {index_path}) is not supported: diffserve has no native pipeline "
        f"for it and the installed diffusers has no pipeline of that name. Supported: {', '.join(supported_models())} "
        "natively, and any pipeline class of the installed diffusers through the adapter"
    )


def resolve_model(od_config: "OmniDiffusionConfig") -> None:
    """Fill od_config.model (local path), model_class_name, model_config, the chosen backend and the
    pipeline's import path from the checkpoint. Settings the diffusers adapter cannot honour are
    refused here, before any worker starts."""
    load_plugins()
    path = resolve_model_path(od_config.model, od_config.revision)
    index = read_model_index(path)
    class_name = index["_class_name"]
    backend = choose_backend(class_name, od_config.backend, os.path.join(path, MODEL_INDEX))
    check_component_folders(path, index)
    od_config.model = path
    od_config.model_class_name = class_name
    od_config.model_config = index
    od_config.resolved_backend = backend
    if backend == "diffusers":
        from diffserve.models.diffusers_adapter.features import check_adapter_features

        check_adapter_features(od_config)
        od_config.pipeline_import_path = ADAPTER_IMPORT_PATH
    else:
        od_config.pipeline_import_path = pipeline_import_path(class_name)


def _import(import_path: str):
    module, _, attr = import_path.partition(":")
    return importlib.import_module(module), attr


def get_pipeline_class(class_name: str) -> type["nn.Module"]:
    module, attr = _import(pipeline_import_path(class_name))
    return getattr(module, attr)


def initialize_model(od_config: "OmniDiffusionConfig") -> "nn.Module":
    """Instantiate the pipeline for an already resolved config (weights are loaded afterwards)."""
    if od_config.pipeline_import_path is None:
        resolve_model(od_config)
    module, attr = _import(od_config.pipeline_import_path)
    return getattr(module, attr)(od_config=od_config)


def _get_process_func(table: dict[str, str], od_config: "OmniDiffusionConfig") -> Callable | None:
    factory_name = table.get(od_config.model_class_name)
    if factory_name is None:
        return None
    module, _ = _import(od_config.pipeline_import_path)
    return getattr(module, factory_name)(od_config)


def get_pre_process_func(od_config: "OmniDiffusionConfig") -> Callable | None:
    return _get_process_func(_DIFFUSION_PRE_PROCESS_FUNCS, od_config)


def get_post_process_func(od_config: "OmniDiffusionConfig") -> Callable | None:
    return _get_process_func(_DIFFUSION_POST_PROCESS_FUNCS, od_config)
