"""Helpers the endpoint families share: running a request, model and modality checks, form parsing."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from diffserve.engine.admission import InvalidRequestError
from diffserve.engine.async_engine import WorkBudgetError
from diffserve.engine.errors import EngineUnavailable
from diffserve.engine.scheduler import QueueFullError
from diffserve.request import DiffusionOutput, OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput
from diffserve.server.encoding import decode_image
from diffserve.server.errors import APIError, describe_validation_errors
from diffserve.server.state import ServerState

ENDPOINTS_BY_MODALITY = {
    "image": "/v1/images/generations",
    "video": "/v1/videos",
    "audio": "/v1/audio/generations",
}


def build_request(prompt: Any, **params: Any) -> OmniDiffusionRequest:
    """One user request from its prompt (a string or a prompt dict) and sampling parameters; invalid
    values are a 400."""
    try:
        sampling_params = OmniDiffusionSamplingParams(**params)
        return OmniDiffusionRequest(prompts=[PromptInput.from_user(prompt, sampling_params)],
                                    sampling_params=sampling_params)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


# How each kind of failed output is answered.
STATUS_BY_ERROR_TYPE = {"invalid_request": 400, "aborted": 499, "timeout": 504, "unavailable": 503}


def as_api_error(exc: Exception) -> APIError:
    """The HTTP answer to an engine refusal (anything else is a bug: re-raised as it is)."""
    if isinstance(exc, (InvalidRequestError, WorkBudgetError)):
        return APIError(400, str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc), code="unavailable", retry_after_s=exc.retry_after_s)
    raise exc


def admit(state: ServerState, req: OmniDiffusionRequest, max_seconds: float | None) -> OmniDiffusionRequest:
    """`req` resolved against the served model's spec and within the work budget, or a 4xx/503."""
    try:
        return state.engine.admit(req, max_seconds)
    except (InvalidRequestError, WorkBudgetError, EngineUnavailable) as exc:
        raise as_api_error(exc) from None


def adapter_model_names(state: ServerState) -> list[str]:
    """The model ids that select a LoRA adapter: "<served name>:<adapter>" (vLLM's convention)."""
    return [f"{state.config.served_model_name}:{adapter}" for adapter in state.config.lora_adapters]


def check_model(state: ServerState, model: str | None) -> str | None:
    """404 for a model not served here; the LoRA adapter a "<model>:<adapter>" id selects, else None."""
    names = state.config.served_model_names
    if model is None or model in names:
        return None
    base, _, adapter = model.rpartition(":")
    if base in names and adapter in state.config.lora_adapters:
        return adapter
    available = ", ".join([*names, *adapter_model_names(state)])
    raise APIError(404, f"model {model!r} is not served here; available: {available}", "model", "model_not_found")


def request_lora(adapter: str | None, lora: dict[str, float] | None) -> dict[str, float] | None:
    """The body's `lora` plus the adapter a "<model>:<adapter>" id selected, at scale 1 unless the body
    gives it another."""
    if adapter is None:
        return lora
    return {adapter: 1.0, **(lora or {})}


def require_modality(state: ServerState, modality: str, endpoint: str) -> None:
    served = state.spec.modality
    if served != modality:
        right = ENDPOINTS_BY_MODALITY.get(served, "another endpoint")
        raise APIError(
            400,
            f"{endpoint} needs {'an' if modality[0] in 'aeiou' else 'a'} {modality} model, but {state.config.served_model_name!r} generates {served}; "
            f"use {right}",
            "model",
            "wrong_endpoint_for_model",
        )


def _raise_for_output(out: DiffusionOutput) -> None:
    if out.error is None:
        return
    status = STATUS_BY_ERROR_TYPE.get(out.error_type or "", 500)
    raise APIError(status, out.error, code=out.error_type if status != 500 else None)


async def run_request(state: ServerState, request: Request | None, req: OmniDiffusionRequest, progress=None):
    """Admit and queue a synchronous request (within the work budget), then wait, watching for the
    client leaving and the timeout."""
    timeout = state.config.request_timeout_s
    task = asyncio.ensure_future(state.engine.generate(req, progress, max_seconds=state.config.max_work_s))
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if task in done:
                try:
                    out = task.result()
                except (InvalidRequestError, WorkBudgetError, QueueFullError, EngineUnavailable) as exc:
                    raise as_api_error(exc) from None
                _raise_for_output(out)
                return out
            if request is not None and await request.is_disconnected():
                raise APIError(499, "the client disconnected; the request was aborted")
            if deadline is not None and loop.time() > deadline:
                raise APIError(504, f"the request did not finish within {timeout:.0f} s and was aborted",
                               code="timeout")
    finally:
        if not task.done():
            task.cancel()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def read_form(request: Request, state: ServerState):
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, f"this endpoint takes multipart/form-data, got {content_type or 'no content type'!r}")
    try:
        return await request.form(max_files=state.config.max_images_per_edit + 2, max_fields=64)
    except Exception as exc:  # malformed multipart bodies
        raise APIError(400, f"cannot parse the multipart body: {exc}") from None


def form_fields(form, skip: tuple[str, ...]) -> dict[str, str]:
    """Text fields of a form as a dict of strings (validate_body(..., form=True) parses numbers by each
    field's type, so a prompt of digits stays a prompt)."""
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in skip or isinstance(value, UploadFile):
            continue
        if key in fields:
            raise APIError(400, f"field {key!r} was given more than once", key)
        fields[key] = value
    return fields


def validate_body(model: type[BaseModel], fields: dict[str, Any], form: bool = False):
    """A pydantic body from JSON or (form=True) multipart fields, its errors as one 400 line naming
    the first field."""
    try:
        return model.model_validate(fields, context={"form": form})
    except ValidationError as exc:
        message, param = describe_validation_errors(exc.errors())
        raise APIError(400, message, param) from None


async def read_upload(upload: UploadFile, param: str):
    return decode_image(await upload.read(), param)
