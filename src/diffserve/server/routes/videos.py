"""Video generation as asynchronous jobs: POST /v1/videos, GET /v1/videos[/{id}[/content]],
DELETE /v1/videos/{id} (OpenAI's video API)."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from diffserve.request import OmniDiffusionRequest
from diffserve.server.common import (
    admit,
    build_request,
    check_model,
    form_fields,
    read_form,
    read_upload,
    require_modality,
    run_request,
    validate_body,
)
from diffserve.server.errors import APIError
from diffserve.server.jobs import VideoJobStore
from diffserve.server.protocol import VideoCreateRequest, parse_size
from diffserve.server.state import ServerState

logger = logging.getLogger(__name__)


def frames_for_seconds(seconds: float, fps: int, frames_multiple: int | None) -> int:
    """The frame count closest to `seconds` at `fps` that the model's VAE takes (k * multiple + 1)."""
    m = frames_multiple or 1
    return round(seconds * fps / m) * m + 1


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    config = state.config

    def jobs() -> VideoJobStore:
        require_modality(state, "video", "/v1/videos")
        assert state.jobs is not None
        return state.jobs

    def job(job_id: str):
        found = jobs().get(job_id)
        if found is None:
            raise APIError(404, f"no video job {job_id!r}", "video_id", "not_found")
        return found

    async def read_body(request: Request):
        """(fields, input_reference image or None) from a multipart form or a JSON body."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await read_form(request, state)
            upload = form.get("input_reference")
            reference = await read_upload(upload, "input_reference") if isinstance(upload, UploadFile) else None
            return form_fields(form, skip=("input_reference",)), reference
        try:
            fields = await request.json()
        except Exception:
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise APIError(400, "the body must be a JSON object")
        return fields, None

    @api.post("/v1/videos")
    async def videos_create(request: Request):
        store = jobs()
        fields, reference = await read_body(request)
        body = validate_body(VideoCreateRequest, fields)
        check_model(state, body.model)
        if reference is not None and not state.spec.takes_images:
            raise APIError(400, f"{config.served_model_name!r} is text-to-video; it takes no input_reference",
                           "input_reference")
        height, width = parse_size(body.size)
        fps = body.fps or state.spec.defaults.get("fps")
        num_frames = body.num_frames
        if num_frames is None and body.seconds is not None:
            num_frames = frames_for_seconds(float(body.seconds), fps, state.spec.frames_multiple)
        prompt = {"prompt": body.prompt} | ({"image": reference} if reference is not None else {})
        req = build_request(
            prompt, height=height, width=width, num_frames=num_frames, fps=body.fps,
            num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
            guidance_scale_2=body.guidance_scale_2, negative_prompt=body.negative_prompt, seed=body.seed,
            output_type="np",
        )
        # Admit now: a request the model cannot run is this call's 400, not a failed job later.
        req = admit(state, req)
        new_job = store.create(
            prompt=body.prompt, model=config.served_model_name, size=body.size or "auto",
            seconds=str(body.seconds) if body.seconds is not None else "auto", num_frames=num_frames, fps=fps,
            seed=req.prompts[0].seed,
        )
        task = asyncio.create_task(_run_video_job(state, new_job.id, req))
        state.background.add(task)
        state.job_tasks[new_job.id] = task
        task.add_done_callback(lambda t: (state.background.discard(t), state.job_tasks.pop(new_job.id, None)))
        return JSONResponse(new_job.to_api())

    @api.get("/v1/videos")
    async def videos_list(limit: int = 20, after: str | None = None, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit must be between 1 and 100, got {limit}", "limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", "order")
        page, has_more = jobs().list(limit, after, order)
        data = [j.to_api() for j in page]
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @api.get("/v1/videos/{video_id}")
    async def videos_retrieve(video_id: str):
        return job(video_id).to_api()

    @api.get("/v1/videos/{video_id}/content")
    async def videos_content(video_id: str, variant: str = "video"):
        found = job(video_id)
        if variant != "video":
            raise APIError(400, f"variant must be 'video', got {variant!r}", "variant")
        if found.status != "completed":
            raise APIError(409, f"video {video_id} is not ready (status {found.status!r})", "video_id", "not_ready")
        return FileResponse(state.jobs.content_path(video_id), media_type="video/mp4", filename=f"{video_id}.mp4")

    @api.delete("/v1/videos/{video_id}")
    async def videos_delete(video_id: str):
        job(video_id)
        task = state.job_tasks.get(video_id)
        if task is not None:
            task.cancel()
        state.jobs.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    return api


async def _run_video_job(state: ServerState, job_id: str, req: OmniDiffusionRequest) -> None:
    jobs = state.jobs

    def progress(done: int, total: int) -> None:
        jobs.update(job_id, status="in_progress", progress=int(100 * done / max(total, 1)))

    try:
        out = await run_request(state, None, req, progress)
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
