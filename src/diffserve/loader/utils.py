"""Routing checkpoint tensors to parameters.

`AutoWeightsLoader` walks a pipeline: a child that has its own `load_weights` gets the tensors under
its prefix, anything else is matched parameter by parameter. `load_weights_with_mapping` is the
one-pass loader transformers use: a rename table maps diffusers names to ours, and
`stacked_params_mapping` routes separate q/k/v tensors into fused parameters with a shard id.
"""

from __future__ import annotations

import itertools
from typing import Container, Iterable

import torch
import torch.nn as nn

from diffserve.loader.sharded import ShardWindow
from diffserve.loader.weight_utils import WeightLoadingError, Weights, default_weight_loader

# (fused param fragment, checkpoint fragment, shard id)
StackedMapping = list[tuple[str, str, int | str]]


def fused_qkv(
    attn: str, fused: str = "to_qkv", names: tuple[str, str, str] = ("to_q", "to_k", "to_v")
) -> StackedMapping:
    """Checkpoint q/k/v projections of `attn` (e.g. ".attn.") loaded into one QKVParallelLinear."""
    return [(f"{attn}{fused}.", f"{attn}{name}.", shard) for name, shard in zip(names, "qkv")]


def fused_kv(attn: str, fused: str = "to_kv", names: tuple[str, str] = ("to_k", "to_v")) -> StackedMapping:
    """Checkpoint k/v projections of `attn` loaded into one column-parallel layer (shards 0 and 1)."""
    return [(f"{attn}{fused}.", f"{attn}{name}.", shard) for shard, name in enumerate(names)]


def joint_attention_qkv(attn: str = ".attn.") -> StackedMapping:
    """A dual-stream (MMDiT) attention: the image stream's to_q/k/v and the text stream's add_*_proj."""
    return fused_qkv(attn) + fused_qkv(attn, "add_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))


def feed_forward_renames(*prefixes: str) -> list[tuple[str, str]]:
    """diffusers' FeedForward (net.0.proj, net.2) -> our MLP (proj_in, proj_out), for each prefix."""
    return [pair for p in prefixes for pair in ((f"{p}net.0.proj.", f"{p}proj_in."), (f"{p}net.2.", f"{p}proj_out."))]


def _call_loader(param: torch.Tensor, tensor: torch.Tensor, name: str, *shard) -> None:
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        # An HSDP-sharded parameter is filled through a window on this rank's rows.
        loader(ShardWindow.of(param), tensor, *shard)
    except WeightLoadingError as exc:
        raise WeightLoadingError(f"{name}: {exc}") from None


def map_checkpoint_name(
    ckpt_name: str,
    params: Container[str],
    stacked_params_mapping: StackedMapping = (),
    renames: list[tuple[str, str]] = (),
) -> tuple[str, int | str | None] | None:
    """Our parameter name for a checkpoint name, with the shard id where it fills one part of a fused
    parameter (None otherwise); None where no parameter of `params` matches. The LoRA loader maps
    adapter targets through the same tables."""
    name = ckpt_name
    for old, new in renames:
        name = name.replace(old, new)
    for fused, part, shard_id in stacked_params_mapping:
        if part in name and name.replace(part, fused) in params:
            return name.replace(part, fused), shard_id
    return (name, None) if name in params else None


def load_weights_with_mapping(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params_mapping: StackedMapping = (),
    renames: list[tuple[str, str]] = (),
) -> set[str]:
    """Load `weights` into `module`; return the names (ours) of the parameters filled.

    Unknown checkpoint names are collected and reported together at the end.
    """
    params = dict(itertools.chain(module.named_parameters(), module.named_buffers()))
    loaded: set[str] = set()
    unexpected: list[str] = []
    for ckpt_name, tensor in weights:
        target = map_checkpoint_name(ckpt_name, params, stacked_params_mapping, renames)
        if target is None:
            unexpected.append(ckpt_name)
            continue
        name, shard_id = target
        if shard_id is None:
            _call_loader(params[name], tensor, ckpt_name)
            loaded.add(name)
        else:
            _call_loader(params[name], tensor, ckpt_name, shard_id)
            # A fused parameter counts as loaded once every shard has come.
            loaded.add(f"{name}#{shard_id}")
    if unexpected:
        raise WeightLoadingError(
            f"{type(module).__name__}: unexpected checkpoint key(s) with no matching parameter: "
            f"{', '.join(sorted(unexpected)[:20])}{' ...' if len(unexpected) > 20 else ''}"
        )
    return _complete_fused(loaded, stacked_params_mapping)


def _complete_fused(loaded: set[str], stacked_params_mapping: StackedMapping) -> set[str]:
    """Turn 'x.qkv.weight#q', '#k', '#v' into 'x.qkv.weight' once every shard of it is present."""
    shards_of: dict[str, set] = {}
    for fused, _, shard_id in stacked_params_mapping:
        shards_of.setdefault(fused, set()).add(shard_id)
    result = {n for n in loaded if "#" not in n}
    seen: dict[str, set] = {}
    for entry in loaded:
        if "#" in entry:
            name, shard = entry.rsplit("#", 1)
            seen.setdefault(name, set()).add(shard)
    for name, shards in seen.items():
        needed = next((s for fused, s in shards_of.items() if fused in name), set())
        if {str(s) for s in needed} <= shards:
            result.add(name)
    return result


class AutoWeightsLoader:
    """Route (name, tensor) pairs to `module`'s children by their first name component."""

    def __init__(self, module: nn.Module, skip_prefixes: Iterable[str] = ()):
        self.module = module
        self.skip_prefixes = tuple(skip_prefixes)

    def load_weights(self, weights: Weights) -> set[str]:
        return self._load(self.module, "", weights)

    def _load(self, module: nn.Module, prefix: str, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load into `module`; return loaded names relative to it. `prefix` only names things in errors."""
        loaded: set[str] = set()
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        children = dict(module.named_children())
        unexpected: list[str] = []
        # Checkpoints list each child's tensors together, so grouping adjacent names by head is enough.
        for head, group in itertools.groupby(weights, key=lambda item: item[0].split(".", 1)[0]):
            if f"{prefix}{head}".startswith(self.skip_prefixes):
                for _ in group:  # drain what we were told to skip
                    pass
            elif head in children:
                child = children[head]
                sub = ((name.split(".", 1)[1], tensor) for name, tensor in group)
                if hasattr(child, "load_weights"):
                    names = child.load_weights(sub)
                else:
                    names = self._load(child, f"{prefix}{head}.", sub)
                loaded |= {f"{head}.{n}" for n in names}
            elif head in own:
                for name, tensor in group:
                    _call_loader(own[head], tensor, f"{prefix}{name}")
                    loaded.add(head)
            else:
                unexpected.extend(f"{prefix}{name}" for name, _ in group)
        if unexpected:
            raise WeightLoadingError(
                f"unexpected checkpoint key(s) with no matching module or parameter: "
                f"{', '.join(sorted(unexpected)[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        return loaded
