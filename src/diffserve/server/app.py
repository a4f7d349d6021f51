"""The OpenAI-compatible HTTP API over an AsyncDiffusionEngine.

Endpoints: POST /v1/images/generations, POST /v1/images/edits, POST /v1/videos (async job),
GET /v1/videos[/{id}[/content]], DELETE /v1/videos/{id}, POST /v1/audio/generations, GET /v1/models,
GET /health, GET /metrics. Every client mistake is a 4xx in OpenAI's error shape; the engine keeps
serving whatever a request does.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from diffserve.engine.async_engine import AsyncDiffusionEngine, QueueFullError
from diffserve.request import DiffusionOutput, OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput
from diffserve.server.encoding import decode_image, encode_image, encode_wav
from diffserve.server.errors import APIError, error_response, install_error_handlers
from diffserve.server.jobs import VideoJobStore
from diffserve.server.metrics import ServerMetrics
from diffserve.server.protocol import (
    AudioGenerationRequest,
    ImageGenerationRequest,
    VideoCreateRequest,
    parse_size,
)

logger = logging.getLogger(__name__)

ENDPOINTS_BY_MODALITY = {
    "image": "/v1/images/generations",
    "video": "/v1/videos",
    "audio": "/v1/audio/generations",
}
DEFAULT_FPS = 16


@dataclass
class ServerConfig:
    served_model_name: str
    modality: str  # "image" | "video" | "audio"
    supports_image_input: bool
    api_key: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    request_timeout_s: float | None = 600.0
    max_n: int = 8
    max_images_per_edit: int = 8


# -- helpers -----------------------------------------------------------------------------------------


def _sampling_params(**kwargs: Any) -> OmniDiffusionSamplingParams:
    try:
        return OmniDiffusionSamplingParams(**kwargs)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


def _check_model(config: ServerConfig, model: str | None) -> None:
    if model is not None and model != config.served_model_name:
        raise APIError(404, f"model {model!r} is not served here; available: {config.served_model_name}",
                       "model", "model_not_found")


def _require_modality(config: ServerConfig, modality: str, endpoint: str) -> None:
    if config.modality != modality:
        right = ENDPOINTS_BY_MODALITY.get(config.modality, "another endpoint")
        raise APIError(
            400,
            f"{endpoint} needs a {modality} model, but {config.served_model_name!r} generates {config.modality}; "
            f"use {right}",
            "model",
            "wrong_endpoint_for_model",
        )


def _raise_for_output(out: DiffusionOutput) -> None:
    if out.error is None:
        return
    status = {"invalid_request": 400, "aborted": 499}.get(out.error_type or "", 500)
    raise APIError(status, out.error)


async def _run(state: "ServerState", request: Request | None, req: OmniDiffusionRequest, progress=None):
    """Queue `req` and wait, watching for the client leaving and the per-request timeout."""
    try:
        task = asyncio.ensure_future(state.engine.generate(req, progress))
    except QueueFullError as exc:
        raise APIError(429, str(exc), code="queue_full") from None
    loop = asyncio.get_running_loop()
    timeout = state.config.request_timeout_s
    deadline = None if timeout is None else loop.time() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if task in done:
                try:
                    out = task.result()
                except QueueFullError as exc:
                    raise APIError(429, str(exc), code="queue_full") from None
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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _form(request: Request, config: ServerConfig):
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, f"this endpoint takes multipart/form-data, got {content_type or 'no content type'!r}")
    try:
        return await request.form(max_files=config.max_images_per_edit + 2, max_fields=64)
    except Exception as exc:  # malformed multipart bodies
        raise APIError(400, f"cannot parse the multipart body: {exc}") from None


def _form_fields(form, skip: tuple[str, ...]) -> dict[str, Any]:
    """Text fields of a form as a dict, numbers converted (multipart carries only strings)."""
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in skip or isinstance(value, UploadFile):
            continue
        if key in fields:
            raise APIError(400, f"field {key!r} was given more than once", key)
        fields[key] = _coerce_form_value(value)
    return fields


def _coerce_form_value(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


async def _read_upload(upload: UploadFile, param: str):
    return decode_image(await upload.read(), param)


# -- the app -----------------------------------------------------------------------------------------


class GuardMiddleware:
    """API key, body size limit and request metrics, as plain ASGI.

    (Starlette's BaseHTTPMiddleware would hide the client's disconnect from the endpoints, which
    need it to abort work nobody waits for.)
    """

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config, metrics = self.state.config, self.state.metrics
        start = time.monotonic()
        path = scope["path"]
        endpoint = path
        if path.startswith("/v1/videos/"):
            endpoint = "/v1/videos/{id}" + ("/content" if path.endswith("/content") else "")
        status = {"code": 500}
        received = {"bytes": 0, "too_large": False}

        async def send_and_record(message):
            if received["too_large"]:
                return  # the app's answer to a cut-off body is replaced by the 413 below
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > config.max_upload_bytes:
                    received["too_large"] = True
                    return {"type": "http.disconnect"}  # stop the app reading; it must not see the rest
            return message

        refusal = self._refusal(scope, config)
        if refusal is not None:
            await refusal(scope, receive, send_and_record)
        else:
            try:
                await self.app(scope, receive_limited, send_and_record)
            except Exception:
                if not received["too_large"]:
                    raise
            if received["too_large"]:
                received["too_large"] = False
                limit = config.max_upload_bytes
                await error_response(413, f"request body exceeds the limit of {limit} bytes")(
                    scope, receive, send_and_record
                )
        metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
        if endpoint.startswith("/v1/") and status["code"] < 400:
            metrics.e2e_latency.labels(endpoint=endpoint).observe(time.monotonic() - start)
        metrics.queue_depth.set(self.state.engine.queue_depth)

    @staticmethod
    def _refusal(scope, config: ServerConfig):
        """An error response for what can be refused from the headers alone, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"].startswith("/v1/") and config.api_key is not None:
            auth = headers.get("authorization", "")
            if auth != f"Bearer {config.api_key}":
                message = "missing API key" if not auth else "invalid API key"
                return error_response(401, f"{message}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, f"invalid Content-Length {length!r}")
            if int(length) > config.max_upload_bytes:
                return error_response(
                    413, f"request body of {int(length)} bytes exceeds the limit of {config.max_upload_bytes} bytes"
                )
        return None



class ServerState:
    def __init__(self, engine: AsyncDiffusionEngine, config: ServerConfig, jobs: VideoJobStore | None):
        self.engine = engine
        self.config = config
        self.jobs = jobs
        self.metrics = ServerMetrics()
        self.background: set[asyncio.Task] = set()
        self.job_tasks: dict[str, asyncio.Task] = {}
        engine.on_batch = self.metrics.observe_batch


def build_app(state: ServerState) -> FastAPI:
    config = state.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for task in list(state.background):
            task.cancel()
        await run_in_threadpool(state.engine.shutdown)

    app = FastAPI(title="diffserve", version="0.1.0", lifespan=lifespan)
    app.state.diffserve = state
    install_error_handlers(app)

    app.add_middleware(GuardMiddleware, state=state)

    # -- images --------------------------------------------------------------------------------------

    async def _images_response(out: DiffusionOutput, fmt: str, compression: int | None, size: str | None):
        encoded = await run_in_threadpool(lambda: [encode_image(img, fmt, compression) for img in out.images])
        state.metrics.outputs.labels(kind="image").inc(len(encoded))
        first = out.images[0]
        return {
            "created": int(time.time()),
            "data": [{"b64_json": _b64(data), "revised_prompt": None} for data in encoded],
            "output_format": fmt,
            "size": size if size not in (None, "auto") else f"{first.width}x{first.height}",
            "seed": out.seed,
        }

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request):
        _check_model(config, body.model)
        _require_modality(config, "image", "/v1/images/generations")
        if body.n > config.max_n:
            raise APIError(400, f"n={body.n} is too large; at most {config.max_n} images per request", "n")
        height, width = parse_size(body.size)
        params = _sampling_params(
            height=height, width=width, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale or 1.0,
            negative_prompt=body.negative_prompt, seed=body.seed, num_outputs_per_prompt=body.n,
        )
        req = OmniDiffusionRequest(prompts=[PromptInput.from_user(body.prompt, params)], sampling_params=params)
        out = await _run(state, request, req)
        return await _images_response(out, body.output_format, body.output_compression, body.size)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        form = await _form(request, config)
        uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
        if form.get("mask") is not None:
            raise APIError(400, "mask is not supported: the edit applies to the whole image", "mask")
        fields = _form_fields(form, skip=("image", "image[]"))
        try:
            body = ImageGenerationRequest.model_validate(fields)
        except ValidationError as exc:
            raise APIError(400, "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                                          for e in exc.errors()), "body") from None
        _check_model(config, body.model)
        if not config.supports_image_input:
            raise APIError(400, f"{config.served_model_name!r} does not take input images, so it cannot edit; "
                                f"use {ENDPOINTS_BY_MODALITY.get(config.modality)}", "model", "wrong_endpoint_for_model")
        _require_modality(config, "image", "/v1/images/edits")
        if not uploads:
            raise APIError(400, "at least one 'image' file is required", "image")
        if len(uploads) > config.max_images_per_edit:
            raise APIError(400, f"{len(uploads)} images given; at most {config.max_images_per_edit}", "image")
        if body.n > config.max_n:
            raise APIError(400, f"n={body.n} is too large; at most {config.max_n} images per request", "n")
        images = [await _read_upload(u, "image") for u in uploads]
        height, width = parse_size(body.size)
        params = _sampling_params(
            height=height, width=width, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale or 1.0,
            negative_prompt=body.negative_prompt, seed=body.seed, num_outputs_per_prompt=body.n,
            strength=body.strength,
        )
        prompt = PromptInput.from_user({"prompt": body.prompt, "images": images}, params)
        out = await _run(state, request, OmniDiffusionRequest(prompts=[prompt], sampling_params=params))
        return await _images_response(out, body.output_format, body.output_compression, body.size)

    # -- videos (asynchronous jobs) -----------------------------------------------------------------

    def _jobs() -> VideoJobStore:
        _require_modality(config, "video", "/v1/videos")
        assert state.jobs is not None
        return state.jobs

    def _job(job_id: str):
        job = _jobs().get(job_id)
        if job is None:
            raise APIError(404, f"no video job {job_id!r}", "video_id", "not_found")
        return job

    @app.post("/v1/videos")
    async def videos_create(request: Request):
        jobs = _jobs()
        reference = None
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await _form(request, config)
            upload = form.get("input_reference")
            if isinstance(upload, UploadFile):
                reference = await _read_upload(upload, "input_reference")
            fields = _form_fields(form, skip=("input_reference",))
        else:
            try:
                fields = await request.json()
            except Exception:
                raise APIError(400, "the body is not valid JSON") from None
            if not isinstance(fields, dict):
                raise APIError(400, "the body must be a JSON object")
        try:
            body = VideoCreateRequest.model_validate(fields)
        except ValidationError as exc:
            raise APIError(400, "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                                          for e in exc.errors()), "body") from None
        _check_model(config, body.model)
        if reference is not None and not config.supports_image_input:
            raise APIError(400, f"{config.served_model_name!r} is text-to-video; it takes no input_reference",
                           "input_reference")
        height, width = parse_size(body.size)
        fps = body.fps or DEFAULT_FPS
        num_frames = body.num_frames
        if num_frames is None and body.seconds is not None:
            num_frames = round(float(body.seconds) * fps / 4) * 4 + 1  # the 4k+1 frames video VAEs need
        params = _sampling_params(
            height=height, width=width, num_frames=num_frames, fps=fps,
            num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
            guidance_scale_2=body.guidance_scale_2, negative_prompt=body.negative_prompt, seed=body.seed,
            output_type="np",
        )
        prompt = {"prompt": body.prompt} | ({"image": reference} if reference is not None else {})
        req = OmniDiffusionRequest(prompts=[PromptInput.from_user(prompt, params)], sampling_params=params)
        job = jobs.create(
            prompt=body.prompt, model=config.served_model_name, size=body.size or "auto",
            seconds=str(body.seconds) if body.seconds is not None else "auto", num_frames=num_frames, fps=fps,
            seed=req.prompts[0].seed,
        )
        task = asyncio.create_task(_run_video_job(state, job.id, req))
        state.background.add(task)
        state.job_tasks[job.id] = task
        task.add_done_callback(lambda t: (state.background.discard(t), state.job_tasks.pop(job.id, None)))
        return JSONResponse(job.to_api())

    @app.get("/v1/videos")
    async def videos_list(limit: int = 20, after: str | None = None, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit must be between 1 and 100, got {limit}", "limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", "order")
        page, has_more = _jobs().list(limit, after, order)
        data = [j.to_api() for j in page]
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}")
    async def videos_retrieve(video_id: str):
        return _job(video_id).to_api()

    @app.get("/v1/videos/{video_id}/content")
    async def videos_content(video_id: str, variant: str = "video"):
        job = _job(video_id)
        if variant != "video":
            raise APIError(400, f"variant must be 'video', got {variant!r}", "variant")
        if job.status != "completed":
            raise APIError(409, f"video {video_id} is not ready (status {job.status!r})", "video_id", "not_ready")
        return FileResponse(state.jobs.content_path(video_id), media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def videos_delete(video_id: str):
        _job(video_id)
        task = state.job_tasks.get(video_id)
        if task is not None:
            task.cancel()
        state.jobs.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    # -- audio ---------------------------------------------------------------------------------------

    @app.post("/v1/audio/generations")
    async def audio_generations(body: AudioGenerationRequest, request: Request):
        _check_model(config, body.model)
        _require_modality(config, "audio", "/v1/audio/generations")
        params = _sampling_params(
            audio_end_in_s=body.seconds, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, negative_prompt=body.negative_prompt, seed=body.seed,
            output_type="np",
        )
        req = OmniDiffusionRequest(prompts=[PromptInput.from_user(body.prompt, params)], sampling_params=params)
        out = await _run(state, request, req)
        wav = await run_in_threadpool(encode_wav, out.audio[0], out.sample_rate)
        state.metrics.outputs.labels(kind="audio").inc()
        return Response(content=wav, media_type="audio/wav", headers={"X-Seed": str(out.seed)})

    # -- service -------------------------------------------------------------------------------------

    def _model_card() -> dict:
        return {"id": config.served_model_name, "object": "model", "created": 0, "owned_by": "diffserve",
                "modality": config.modality}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        _check_model(config, model_id)
        return _model_card()

    @app.get("/health")
    async def health():
        if not state.engine.is_healthy():
            return error_response(503, "the engine is not running (a worker died or it was shut down)")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        state.metrics.queue_depth.set(state.engine.queue_depth)
        return Response(content=state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _run_video_job(state: ServerState, job_id: str, req: OmniDiffusionRequest) -> None:
    jobs = state.jobs

    def progress(done: int, total: int) -> None:
        jobs.update(job_id, status="in_progress", progress=int(100 * done / max(total, 1)))

    try:
        out = await _run(state, None, req, progress)
        from diffserve.media import write_mp4

        frames = out.frames[0] if out.frames is not None else out.images[0]
        await run_in_threadpool(write_mp4, jobs.content_path(job_id), frames, req.sampling_params.fps)
        state.metrics.outputs.labels(kind="video").inc()
        jobs.update(job_id, status="completed", progress=100, completed_at=int(time.time()))
    except asyncio.CancelledError:
        jobs.update(job_id, status="failed", error={"code": "cancelled", "message": "the job was cancelled"})
        raise
    except APIError as exc:
        jobs.update(job_id, status="failed", error={"code": exc.code or "generation_failed", "message": exc.message})
    except Exception as exc:
        logger.exception("video job %s failed", job_id)
        jobs.update(job_id, status="failed", error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
