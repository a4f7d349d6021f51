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

from diffserve.engine.admission import InvalidRequestError
from diffserve.engine.async_engine import WorkBudgetError
from diffserve.engine.errors import EngineUnavailable
from diffserve.engine.scheduler import QueueFullError
from diffserve.server.common import (
    STATUS_BY_ERROR_TYPE,
    as_api_error,
    build_request,
    check_model,
    form_fields,
    read_form,
    read_upload,
    request_lora,
    require_modality,
    validate_body,
)
from diffserve.server.errors import APIError
from diffserve.server.jobs import VideoJobStore
from diffserve.server.protocol import VideoCreateRequest, parse_size
from diffserve.server.state import ServerState

logger = logging.getLogger(__name__)


# The most frames a job may ask for, however it asks (num_frames or seconds x fps).
MAX_FRAMES = 1025


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

    async def read_body(request: Request) -> tuple[VideoCreateRequest, object]:
        """(validated body, input_reference image or None) from a multipart form or a JSON body."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await read_form(request, state)
            upload = form.get("input_reference")
            reference = await read_upload(upload, "input_reference") if isinstance(upload, UploadFile) else None
            return validate_body(VideoCreateRequest, form_fields(form, skip=("input_reference",)), form=True), reference
        try:
            fields = await request.json()
        except Exception:
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise APIError(400, "the body must be a JSON object")
        return validate_body(VideoCreateRequest, fields), None

    def frame_count(body: VideoCreateRequest, fps: int) -> int | None:
        """num_frames as given, or from seconds at fps (in the VAE's frame steps); both must agree."""
        if body.seconds is None:
            return body.num_frames
        frames = frames_for_seconds(float(body.seconds), fps, state.spec.frames_multiple)
        if body.num_frames is not None and body.num_frames != frames:
            raise APIError(400, f"seconds={body.seconds} at {fps} fps is {frames} frames, but num_frames="
                                f"{body.num_frames}; give one of them", "num_frames")
        if frames > MAX_FRAMES:
            raise APIError(400, f"seconds={body.seconds} at {fps} fps is {frames} frames; at most {MAX_FRAMES}",
                           "seconds")
        return frames

    @api.post("/v1/videos")
    async def videos_create(request: Request):
        store = jobs()
        store.expire()
        body, reference = await read_body(request)
        adapter = check_model(state, body.model)
        if reference is not None and not state.spec.takes_images:
            raise APIError(400, f"{config.served_model_name!r} is text-to-video; it takes no input_reference",
                           "input_reference")
        limit = config.max_job_storage_bytes
        if limit is not None and store.stored_bytes() > limit:
            raise APIError(507, f"the stored videos exceed this server's limit of {limit} bytes; delete finished "
                                "jobs (DELETE /v1/videos/{id}) or wait for them to expire", code="storage_full")
        height, width = parse_size(body.size)
        fps = body.fps or state.spec.defaults.get("fps")
        num_frames = frame_count(body, fps)
        prompt = {"prompt": body.prompt} | ({"image": reference} if reference is not None else {})
        req = build_request(
            prompt, height=height, width=width, num_frames=num_frames, fps=body.fps,
            num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
            guidance_scale_2=body.guidance_scale_2, negative_prompt=body.negative_prompt, seed=body.seed,
            lora=request_lora(adapter, body.lora),
        )
        progress = JobProgress(store)
        try:  # admitted and queued now: a request the model cannot run is this call's error, with no job
            submission = state.engine.submit(req, progress.on_step, max_seconds=config.job_timeout_s,
                                             queue_timeout_s=config.job_queue_timeout_s,
                                             run_timeout_s=config.job_timeout_s)
        except (InvalidRequestError, WorkBudgetError, QueueFullError, EngineUnavailable) as exc:
            raise as_api_error(exc) from None
        admitted = submission.request.sampling_params
        new_job = store.create(
            prompt=body.prompt, model=config.served_model_name, size=f"{admitted.width}x{admitted.height}",
            seconds=str(body.seconds) if body.seconds is not None else "auto", num_frames=admitted.num_frames,
            fps=admitted.fps, seed=req.prompts[0].seed,
        )
        progress.job_id = new_job.id
        task = asyncio.create_task(_run_video_job(state, new_job.id, submission))
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


class JobProgress:
    """A job's progress: denoise steps fill 0-90%, decoding 90-95%, MP4 encoding 95-100%."""

    def __init__(self, store: VideoJobStore):
        self.store = store
        self.job_id: str | None = None  # known once the job exists (after admission)

    def on_step(self, done: int, total: int) -> None:
        if self.job_id is not None:
            self.store.update(self.job_id, status="in_progress", progress=int(90 * done / max(total, 1)))


async def _run_video_job(state: ServerState, job_id: str, submission) -> None:
    jobs = state.jobs
    try:
        out = await submission.wait()
        if out.error is not None:
            code = out.error_type if out.error_type in ("timeout", "unavailable", "invalid_request") else None
            raise APIError(STATUS_BY_ERROR_TYPE.get(out.error_type or "", 500), out.error, code=code)
        jobs.update(job_id, progress=95)
        from diffserve.media import write_mp4

        frames = out.frames[0]
        await run_in_threadpool(write_mp4, jobs.partial_path(job_id), frames, submission.request.sampling_params.fps)
        if jobs.publish(job_id):
            state.metrics.outputs.labels(kind="video").inc()
            jobs.update(job_id, status="completed", progress=100, completed_at=int(time.time()))
    except asyncio.CancelledError:
        jobs.discard_partial(job_id)
        jobs.update(job_id, status="failed", error={"code": "cancelled", "message": "the job was cancelled"})
        raise
    except APIError as exc:
        jobs.discard_partial(job_id)
        jobs.update(job_id, status="failed", error={"code": exc.code or "generation_failed", "message": exc.message})
    except Exception as exc:
        logger.exception("video job %s failed", job_id)
        jobs.discard_partial(job_id)
        jobs.update(job_id, status="failed", error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
