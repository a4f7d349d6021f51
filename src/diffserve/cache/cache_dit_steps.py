"""Cache-DiT under step-level batching: DBCache's decision per request, on cache-dit's own contexts.

cache-dit's block-list wrapper decides once per transformer call, from the relative change of the
first Fn blocks' residual over the whole batch, and keeps one residual per context. Under step
batching (diffserve.engine.step_batching) the batch holds several requests at their own steps, so
each running request gets its own cache-dit contexts (one per block list, built from the same
arguments as the ones `refresh_context` builds for a request alone), and while a step-batched call
runs, each block list is swapped for `DBCacheRows`, which does what cache-dit's wrapper does with
each request's contexts and rows:

- the first Fn blocks run on every row (one batched call);
- per request, with its context current: mark the step, ask the context whether its own rows'
  Fn residual may use the cache (cache-dit's `can_cache`: warmup, step caps, threshold, the
  request's previous Fn residual), then apply its cache (`apply_cache`, with its calibrators) or
  store its Fn residual;
- the middle blocks run on the computing requests' rows only (one batched call), and each of those
  requests stores its own residual (`set_Bn_buffer`, `set_Bn_encoder_buffer`);
- the last Bn blocks run on every row.

Each request thus takes the decisions and residuals it takes alone. A request run alone (the
request path) still goes through cache-dit's own wrapper.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from diffserve.cache.blocks import CachedBlockList, args_rows, cache_block_lists, pack_outputs, rows_of, run_blocks

# Blocks that create the encoder stream (patterns 4 and 5) go through cache-dit's other wrapper
# family, which this one does not reproduce.
STEP_BATCHED_PATTERNS = ("Pattern_0", "Pattern_1", "Pattern_2", "Pattern_3")


def fresh_context(template):
    """A new cache-dit context built as `refresh_context` rebuilds `template`, not registered in the
    manager (a request alone keeps using the registered one)."""
    context = type(template)(*template._init_args, **copy.deepcopy(template._init_kwargs))
    context._init_args, context._init_kwargs = template._init_args, template._init_kwargs
    return context


@dataclass(eq=False)
class RequestRows:
    """One request's rows of the current batch and its contexts (context name -> context)."""

    contexts: dict[str, Any]
    rows: torch.Tensor


class DBCacheRows(nn.Module):
    """Stands in for one block list during a step-batched forward (see the module docstring)."""

    def __init__(self, steps: "CacheDiTSteps", block_list: CachedBlockList, context_name: str):
        super().__init__()
        # Plain attributes, not submodules: the module tree keeps the blocks where they are.
        object.__setattr__(self, "_steps", steps)
        object.__setattr__(self, "_blocks", block_list.blocks)
        self.attr = block_list.attr
        self.io = block_list.io
        self.context_name = context_name

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        manager = self._steps.manager
        requests = self._steps.requests
        manager.set_context(requests[0].contexts[self.context_name])  # every request has the same config
        fn, bn = manager.Fn_compute_blocks(), manager.Bn_compute_blocks()
        h, e = run_blocks(self._blocks[:fn], self.io, hidden_states, args, kwargs)
        fn_residual = h - hidden_states
        cached = {}
        for request in requests:
            applied = self._cached(request, h, e, fn_residual)
            if applied is not None:
                cached[request] = applied
        computing = [r for r in requests if r not in cached]
        out_h, out_e = torch.empty_like(h), (torch.empty_like(e) if e is not None else None)
        if computing:
            self._run_middle(computing, h, e, args, kwargs, len(self._blocks) - bn, out_h, out_e)
        for request, (cached_h, cached_e) in cached.items():
            out_h.index_copy_(0, request.rows, cached_h)
            if e is not None:
                out_e.index_copy_(0, request.rows, cached_e)
        if bn > 0:
            out_h, out_e = run_blocks(self._blocks[len(self._blocks) - bn:], self.io, out_h,
                                      self._with_encoder(args, out_e), kwargs)
        return pack_outputs(self.io, out_h, out_e)

    def _cached(self, request: RequestRows, h, e, fn_residual):
        """With `request`'s context: its rows after applying its cache, or None when it computes (its
        Fn residual then stored), as cache-dit's wrapper decides for a batch of its rows alone."""
        manager, prefix = self._steps.manager, self.attr
        manager.set_context(request.contexts[self.context_name])
        manager.mark_step_begin()
        l1 = manager.is_l1_diff_enabled()
        signal = (h if l1 else fn_residual).index_select(0, request.rows)
        # Step batching runs on one device: nothing is parallelized.
        if manager.can_cache(signal, parallelized=False,
                             prefix=f"{prefix}_Fn_hidden_states" if l1 else f"{prefix}_Fn_residual"):
            manager.add_cached_step()
            return manager.apply_cache(
                h.index_select(0, request.rows), rows_of(e, request.rows),
                prefix=f"{prefix}_Bn_residual" if manager.is_cache_residual() else f"{prefix}_Bn_hidden_states",
                encoder_prefix=(f"{prefix}_Bn_residual" if manager.is_encoder_cache_residual()
                                else f"{prefix}_Bn_hidden_states"),
            )
        manager.set_Fn_buffer(fn_residual.index_select(0, request.rows), prefix=f"{prefix}_Fn_residual")
        if l1:
            manager.set_Fn_buffer(signal, f"{prefix}_Fn_hidden_states")
        return None

    def _run_middle(self, computing: list[RequestRows], h, e, args, kwargs, end: int, out_h, out_e) -> None:
        """The middle blocks on the computing requests' rows; each stores its residuals."""
        manager, prefix = self._steps.manager, self.attr
        rows = torch.cat([r.rows for r in computing])
        sub_args, sub_kwargs = args_rows(self._with_encoder(args, e), kwargs, rows, h.shape[0])
        sub_h, sub_e = h.index_select(0, rows), rows_of(e, rows)
        mid_h, mid_e = run_blocks(self._blocks[manager.Fn_compute_blocks():end], self.io, sub_h, sub_args,
                                  sub_kwargs)
        mid_h = mid_h.contiguous()
        residual_h = mid_h - sub_h
        residual_e = mid_e.contiguous() - sub_e if mid_e is not None and sub_e is not None else None
        start = 0
        for request in computing:
            local = torch.arange(start, start + len(request.rows), device=rows.device)
            start += len(request.rows)
            manager.set_context(request.contexts[self.context_name])
            if manager.is_cache_residual():
                manager.set_Bn_buffer(residual_h.index_select(0, local), prefix=f"{prefix}_Bn_residual")
            else:
                manager.set_Bn_buffer(mid_h.index_select(0, local), prefix=f"{prefix}_Bn_hidden_states")
            if manager.is_encoder_cache_residual():
                manager.set_Bn_encoder_buffer(rows_of(residual_e, local), prefix=f"{prefix}_Bn_residual")
            else:
                manager.set_Bn_encoder_buffer(rows_of(mid_e, local), prefix=f"{prefix}_Bn_hidden_states")
        out_h.index_copy_(0, rows, mid_h)
        if mid_e is not None:
            out_e.index_copy_(0, rows, mid_e)

    def _with_encoder(self, args: tuple, e: torch.Tensor | None) -> tuple:
        return (e, *args[1:]) if self.io.takes_encoder else args


class CacheDiTSteps:
    """Wraps one cache-dit transformer's forward: a request alone runs cache-dit's forward; a
    step-batched call (`requests` set) runs the model's forward with `DBCacheRows` lists."""

    def __init__(self, transformer: nn.Module):
        lists = cache_block_lists(transformer)
        names = list(transformer._context_names)
        for lst in lists:
            if lst.pattern not in STEP_BATCHED_PATTERNS:
                raise ValueError(
                    f"cache_backend='cache_dit' under batching='step' cannot run {type(transformer).__name__}."
                    f"{lst.attr}: its blocks are {lst.pattern}; allowed: {', '.join(STEP_BATCHED_PATTERNS)}"
                )
        self.transformer = transformer
        self.manager = transformer._context_manager
        self.context_names = names
        self.wrappers = {lst.attr: nn.ModuleList([DBCacheRows(self, lst, name)]) for lst, name in zip(lists, names)}
        self.requests: list[RequestRows] | None = None
        self._cached_forward = transformer.forward  # cache-dit's
        transformer.forward = self.forward

    def remove(self) -> None:
        self.transformer.forward = self._cached_forward

    def new_contexts(self) -> dict[str, Any]:
        return {name: fresh_context(self.manager.get_context(name)) for name in self.context_names}

    def forward(self, *args: Any, **kwargs: Any):
        if self.requests is None:
            return self._cached_forward(*args, **kwargs)
        originals = {attr: getattr(self.transformer, attr) for attr in self.wrappers}
        try:
            for attr, wrapper in self.wrappers.items():
                setattr(self.transformer, attr, wrapper)
            # The model's own forward, as cache-dit keeps it (its wrapper lists are not swapped in).
            return self.transformer._original_forward(*args, **kwargs)
        finally:
            for attr, blocks in originals.items():
                setattr(self.transformer, attr, blocks)
