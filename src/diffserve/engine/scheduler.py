"""Batching: merge compatible requests into one pipeline call and split the result back.

Requests are compatible when every sampling parameter but the seed and negative prompt is equal, and
they agree on whether true CFG is on (a prompt alone without a negative prompt runs without CFG, so
it must not be batched with prompts that have one) and on whether they bring input images (an
image-to-image call is not a text-to-image one). Order among compatible requests is kept.
"""

from __future__ import annotations

import dataclasses

from diffserve.request import DiffusionOutput, OmniDiffusionRequest


def batch_key(req: OmniDiffusionRequest) -> tuple:
    has_negative = tuple(sorted({p.negative_prompt is not None for p in req.prompts}))
    image_counts = tuple(sorted({len(p.images or ()) for p in req.prompts}))
    return (req.sampling_params.batch_key(), has_negative, image_counts)


def make_batches(requests: list[OmniDiffusionRequest], max_batch_size: int) -> list[list[OmniDiffusionRequest]]:
    """Group requests (in arrival order) into batches of at most `max_batch_size` prompts."""
    open_batches: dict[tuple, list[OmniDiffusionRequest]] = {}
    batches: list[list[OmniDiffusionRequest]] = []
    for req in requests:
        key = batch_key(req)
        batch = open_batches.get(key)
        if batch is not None and sum(len(r.prompts) for r in batch) + len(req.prompts) <= max_batch_size:
            batch.append(req)
            continue
        batch = [req]
        batches.append(batch)
        open_batches[key] = batch
    return batches


def merge_requests(batch: list[OmniDiffusionRequest]) -> OmniDiffusionRequest:
    if len(batch) == 1:
        return batch[0]
    prompts = [p for req in batch for p in req.prompts]
    return OmniDiffusionRequest(prompts=prompts, sampling_params=batch[0].sampling_params)


def _slice(value, start: int, stop: int):
    return None if value is None else value[start:stop]


def split_output(output: DiffusionOutput, batch: list[OmniDiffusionRequest]) -> list[DiffusionOutput]:
    """One output per request of the batch; list/array/tensor outputs are sliced by prompt count."""
    results = []
    start = 0
    per_prompt = batch[0].sampling_params.num_outputs_per_prompt
    for req in batch:
        stop = start + len(req.prompts) * per_prompt
        results.append(
            dataclasses.replace(
                output,
                output=_slice(output.output, start, stop),
                images=_slice(output.images, start, stop),
                frames=_slice(output.frames, start, stop),
                audio=_slice(output.audio, start, stop),
                request_id=req.request_id,
                prompt=req.prompts[0].prompt if len(req.prompts) == 1 else None,
                seed=req.prompts[0].seed if len(req.prompts) == 1 else None,
                metrics={**output.metrics, "batch_size": len(batch)},
            )
        )
        start = stop
    return results
