"""POST /v1/images/generations and POST /v1/images/edits (OpenAI's image API)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from diffserve.request import DiffusionOutput
from diffserve.server.common import (
    ENDPOINTS_BY_MODALITY,
    b64,
    build_request,
    check_model,
    form_fields,
    read_form,
    read_upload,
    request_lora,
    require_modality,
    run_request,
    validate_body,
)
from diffserve.server.encoding import encode_image
from diffserve.server.errors import APIError
from diffserve.server.protocol import ImageGenerationRequest, parse_size
from diffserve.server.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    config = state.config

    async def respond(out: DiffusionOutput, body: ImageGenerationRequest):
        encoded = await run_in_threadpool(
            lambda: [encode_image(img, body.output_format, body.output_compression) for img in out.images]
        )
        state.metrics.outputs.labels(kind="image").inc(len(encoded))
        first = out.images[0]
        return {
            "created": int(time.time()),
            "data": [{"b64_json": b64(data), "revised_prompt": None} for data in encoded],
            "output_format": body.output_format,
            "size": body.size if body.size not in (None, "auto") else f"{first.width}x{first.height}",
            "seed": out.seed,
        }

    def sampling_params(body: ImageGenerationRequest, adapter: str | None) -> dict:
        if body.n > config.max_n:
            raise APIError(400, f"n={body.n} is too large; at most {config.max_n} images per request", "n")
        height, width = parse_size(body.size)
        return dict(
            height=height, width=width, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale,
            negative_prompt=body.negative_prompt, seed=body.seed, num_outputs_per_prompt=body.n,
            strength=body.strength, lora=request_lora(adapter, body.lora),
        )

    @api.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request):
        adapter = check_model(state, body.model)
        require_modality(state, "image", "/v1/images/generations")
        req = build_request(body.prompt, **sampling_params(body, adapter))
        return await respond(await run_request(state, request, req), body)

    @api.post("/v1/images/edits")
    async def images_edits(request: Request):
        form = await read_form(request, state)
        uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
        if form.get("mask") is not None:
            raise APIError(400, "mask is not supported: the edit applies to the whole image", "mask")
        body = validate_body(ImageGenerationRequest, form_fields(form, skip=("image", "image[]")), form=True)
        adapter = check_model(state, body.model)
        if not state.spec.takes_images:
            raise APIError(400, f"{config.served_model_name!r} does not take input images, so it cannot edit; "
                                f"use {ENDPOINTS_BY_MODALITY.get(state.spec.modality)}", "model",
                           "wrong_endpoint_for_model")
        require_modality(state, "image", "/v1/images/edits")
        if not uploads:
            raise APIError(400, "at least one 'image' file is required", "image")
        if len(uploads) > config.max_images_per_edit:
            raise APIError(400, f"{len(uploads)} images given; at most {config.max_images_per_edit}", "image")
        params = sampling_params(body, adapter)
        images = [await read_upload(u, "image") for u in uploads]
        req = build_request({"prompt": body.prompt, "images": images}, **params)
        return await respond(await run_request(state, request, req), body)

    return api
