"""Finding and streaming checkpoint tensors, and the default per-parameter loader.

Safetensors files are opened memory-mapped and read one tensor at a time, so a checkpoint is never
held in RAM twice. `.bin` files are a fallback only, always through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import mmap
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_safetensors_header(path: str, file_size: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightLoadingError(f"cannot read safetensors file {path} (truncated or corrupt?): no header")
        header_len = int.from_bytes(raw, "little")
        if header_len > file_size - 8:
            raise WeightLoadingError(
                f"cannot read safetensors file {path} (truncated or corrupt?): header of {header_len} bytes "
                f"does not fit a {file_size}-byte file"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightLoadingError(f"cannot read safetensors file {path} (truncated or corrupt?): {exc}") from exc
    header.pop("__metadata__", None)
    return header, 8 + header_len


def safetensors_weights_iterator(files: list[str]) -> Weights:
    """Yield tensors that view a copy-on-write memory map of each file.

    Nothing is read until a tensor's bytes are touched, so a tensor-parallel rank that copies only
    its slice of a weight reads only (the pages of) that slice from disk.
    """
    for path in files:
        size = os.path.getsize(path)
        header, data_start = _read_safetensors_header(path, size)
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        for name, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise WeightLoadingError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            shape = info["shape"]
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected or data_start + end > size:
                raise WeightLoadingError(
                    f"cannot read tensor {name!r} from {path} (truncated or corrupt?): its bytes "
                    f"[{data_start + begin}, {data_start + end}) do not fit the {size}-byte file or its shape {shape}"
                )
            if expected == 0:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=expected, offset=data_start + begin)
            yield name, flat.view(dtype).reshape(shape)


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
