"""Finding and streaming checkpoint tensors, and the default per-parameter loader.

Safetensors files are opened memory-mapped and read one tensor at a time, so a checkpoint is never
held in RAM twice. `.bin` files are a fallback only, always through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)

Weights = Iterator[tuple[str, torch.Tensor]]


class WeightLoadingError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def _files_from_index(folder: str, index_file: str) -> list[str]:
    try:
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise WeightLoadingError(f"{index_file} is not a valid sharded-checkpoint index: {exc}") from exc
    files = sorted({os.path.join(folder, name) for name in weight_map.values()})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise WeightLoadingError(f"{index_file} names shard file(s) that do not exist: {', '.join(missing)}")
    return files


def find_weight_files(folder: str, fall_back_to_pt: bool = True) -> tuple[list[str], str]:
    """Return (files, format) for a component folder, preferring safetensors.

    A `*.index.json` (sharded checkpoint) decides which files belong to the checkpoint.
    """
    if not os.path.isdir(folder):
        raise WeightLoadingError(f"weights folder {folder} does not exist")
    for fmt, pattern in (("safetensors", "*.safetensors"), ("pt", "*.bin")):
        if fmt == "pt" and not fall_back_to_pt:
            break
        indexes = sorted(glob.glob(os.path.join(folder, pattern + ".index.json")))
        if indexes:
            return _files_from_index(folder, indexes[0]), fmt
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if files:
            if fmt == "pt":
                logger.warning("no safetensors in %s; falling back to .bin files (loaded with weights_only)", folder)
            return files, fmt
    present = sorted(os.listdir(folder))
    allowed = "*.safetensors" + (" or *.bin" if fall_back_to_pt else "")
    raise WeightLoadingError(f"no weight files ({allowed}) in {folder}; it holds: {present or 'nothing'}")


def safetensors_weights_iterator(files: list[str]) -> Weights:
    from safetensors import safe_open

    for path in files:
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:
            raise WeightLoadingError(f"cannot read safetensors file {path} (truncated or corrupt?): {exc}") from exc
        with handle as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:
                    raise WeightLoadingError(f"cannot read tensor {name!r} from {path}: {exc}") from exc
                yield name, tensor


def pt_weights_iterator(files: list[str]) -> Weights:
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise WeightLoadingError(
                f"cannot load {path} with torch.load(weights_only=True) (corrupt, or it holds more than "
                f"tensors): {exc}"
            ) from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightLoadingError(f"{path} does not hold a state dict (found {type(state).__name__})")
        yield from state.items()
        del state


def weights_iterator(folder: str, fall_back_to_pt: bool = True) -> Weights:
    files, fmt = find_weight_files(folder, fall_back_to_pt)
    return safetensors_weights_iterator(files) if fmt == "safetensors" else pt_weights_iterator(files)


def check_shape(param: torch.Tensor, loaded: torch.Tensor, what: str = "parameter") -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise WeightLoadingError(
            f"{what} has shape {tuple(param.shape)} but the checkpoint tensor has shape {tuple(loaded.shape)}"
        )


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy a full checkpoint tensor into a replicated parameter (casting dtype, moving device)."""
    check_shape(param, loaded)
    param.data.copy_(loaded)


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)
