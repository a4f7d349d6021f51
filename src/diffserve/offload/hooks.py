"""Hooks that tell the offloaders which module is about to run, removable together.

Forward hooks fire however a module is called (a step cache's block-list wrapper calls the blocks
themselves), and not at all for blocks a cache skips. Regional compile traces a block's hooks along
with it, so every hook here is excluded from compilation: it runs eagerly between compiled graphs.
VAEs are entered through `encode`/`decode` rather than `forward`, so those methods are wrapped on the
instance.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn as nn

# Methods other than forward through which pipelines enter a component (diffusers VAEs).
ENTRY_METHODS = ("encode", "decode")


def move_to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (nested in tuples, lists and dicts) on `device`. A container none
    of whose tensors moves is returned as it is: callers may fill it in place (the Wan VAE's feature
    cache is a list its decoder's parts append to)."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, dict):
        moved = {k: move_to_device(v, device) for k, v in value.items()}
        return value if all(moved[k] is v for k, v in value.items()) else type(value)(moved)
    if isinstance(value, (tuple, list)):
        moved = [move_to_device(v, device) for v in value]
        if all(m is v for m, v in zip(moved, value)):
            return value
        if isinstance(value, list):
            return moved
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


class Hooks:
    """Forward hooks and instance-method wrappers on modules; `remove()` undoes them all."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # (module, method name, the instance attribute it replaced or None)
        self._methods: list[tuple[nn.Module, str, Any]] = []

    def before_forward(self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict], Any]) -> None:
        """`fn(module, args, kwargs)` before every call, ahead of hooks registered earlier; it may
        return (args, kwargs) to replace them."""
        self._handles.append(
            module.register_forward_pre_hook(torch.compiler.disable(fn), with_kwargs=True, prepend=True)
        )

    def after_forward(self, module: nn.Module, fn: Callable[[nn.Module], None]) -> None:
        """`fn(module)` after every call, also when the call raised (an aborted request must not leave
        weights on the device)."""

        def hook(module, args, kwargs, output):
            fn(module)

        self._handles.append(
            module.register_forward_hook(torch.compiler.disable(hook), with_kwargs=True, always_call=True)
        )

    def wrap_method(self, module: nn.Module, name: str,
                    before: Callable[[tuple, dict], tuple[tuple, dict]] | None = None,
                    after: Callable[[Any], Any] | None = None) -> None:
        """Call `before(args, kwargs) -> (args, kwargs)` ahead of `module.<name>` (whatever is installed
        there now, e.g. a tiled decode), and `after(result) -> result` on what it returns."""
        current = getattr(module, name)
        previous = module.__dict__.get(name)

        @functools.wraps(current)
        def wrapped(*args, **kwargs):
            if before is not None:
                args, kwargs = before(args, kwargs)
            result = current(*args, **kwargs)
            return result if after is None else after(result)

        setattr(module, name, wrapped)
        self._methods.append((module, name, previous))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, name, previous in reversed(self._methods):
            if previous is None:
                delattr(module, name)
            else:
                setattr(module, name, previous)
        self._handles, self._methods = [], []
