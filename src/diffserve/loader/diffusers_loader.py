"""Build a pipeline and fill its DiT weights from the checkpoint, strictly.

The pipeline's constructor loads the small components (VAE, text encoders) itself and builds the
transformer on the meta device. The loader materializes those meta tensors on the target device,
streams each `ComponentSource` into `pipeline.load_weights`, and then checks that every parameter
and persistent buffer under the sources' prefixes was filled: missing keys are an error that names
them.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from diffserve.loader.weight_utils import WeightLoadingError, Weights, weights_iterator

logger = logging.getLogger(__name__)


def materialize_meta_tensors(module: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialized) storage for meta tensors; the strict load check guarantees they get filled.

    Parameters are replaced one by one, keeping their attributes (`weight_loader`): `to_empty` would
    create fresh Parameters without them.
    """
    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is not None and param.is_meta:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)
                mod._parameters[name] = new
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                mod._buffers[name] = torch.empty_like(buf, device=device)


def move_pipeline_to(pipeline: nn.Module, device: torch.device) -> None:
    """`pipeline.to(device)`, skipping components already there: `.to` would swap HSDP's sharded
    parameters for copies, losing their attributes (`weight_loader`)."""
    for child in pipeline.children():
        if any(t.device != device for t in (*child.parameters(), *child.buffers())):
            child.to(device)
    for name, param in pipeline.named_parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buf in pipeline.named_buffers(recurse=False):
        pipeline._buffers[name] = buf.to(device)


def expected_names(module: nn.Module, prefix: str) -> set[str]:
    """Parameters and persistent buffers of `module` whose full names start with `prefix`."""
    names = {n for n, _ in module.named_parameters()}
    for mod_name, mod in module.named_modules():
        for buf_name in mod._buffers:
            if mod._buffers[buf_name] is not None and buf_name not in mod._non_persistent_buffers_set:
                names.add(f"{mod_name}.{buf_name}" if mod_name else buf_name)
    return {n for n in names if n.startswith(prefix)}


class DiffusersPipelineLoader:
    @dataclass(frozen=True)
    class ComponentSource:
        """Where one component's weights live and under which prefix the pipeline expects them."""

        model_or_path: str
        subfolder: str | None
        prefix: str = ""
        fall_back_to_pt: bool = True
        revision: str | None = None

        def folder(self) -> str:
            from diffserve.registry import resolve_model_path

            root = resolve_model_path(self.model_or_path, self.revision)
            return os.path.join(root, self.subfolder) if self.subfolder else root

    def __init__(self, od_config):
        self.od_config = od_config

    def iter_weights(self, sources: list["DiffusersPipelineLoader.ComponentSource"]) -> Weights:
        for source in sources:
            for name, tensor in weights_iterator(source.folder(), source.fall_back_to_pt):
                yield source.prefix + name, tensor

    def load_weights(self, pipeline: nn.Module) -> set[str]:
        sources = list(getattr(pipeline, "weights_sources", []))
        if not sources:  # a custom model that loaded everything in __init__
            return set()
        loaded = pipeline.load_weights(self.iter_weights(sources))
        if loaded is None:
            raise WeightLoadingError(f"{type(pipeline).__name__}.load_weights must return the set of loaded names")
        expected = set(itertools.chain.from_iterable(expected_names(pipeline, s.prefix) for s in sources))
        missing = sorted(expected - set(loaded))
        if missing:
            raise WeightLoadingError(
                f"checkpoint is missing {len(missing)} weight(s) the model needs: "
                f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
            )
        return set(loaded)

    def load_model(self, device: torch.device, prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
        """Build the pipeline, give its meta tensors storage on `device` and fill them. `prepare(pipeline)`
        runs in between, while the transformers are still on the meta device (a memory check; HSDP
        shards them there, so each rank allocates and reads only its shards)."""
        from diffserve.registry import initialize_model

        start = time.perf_counter()
        pipeline = initialize_model(self.od_config)
        if prepare is not None:
            prepare(pipeline)
        materialize_meta_tensors(pipeline, device)
        move_pipeline_to(pipeline, device)
        loaded = self.load_weights(pipeline)
        pipeline.eval()
        # Dropout and friends must be off: identical seeded runs have to repeat exactly.
        pipeline.requires_grad_(False)
        logger.info(
            "loaded %s (%d tensors from the checkpoint) on %s in %.2f s",
            type(pipeline).__name__,
            len(loaded),
            device,
            time.perf_counter() - start,
        )
        return pipeline
