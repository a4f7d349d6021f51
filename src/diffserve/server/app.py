"""The OpenAI-compatible HTTP API over an AsyncDiffusionEngine.

Endpoints, one module each under server/routes/: images (POST /v1/images/generations,
POST /v1/images/edits), videos (asynchronous jobs: POST /v1/videos, GET /v1/videos[/{id}[/content]],
DELETE /v1/videos/{id}), audio (POST /v1/audio/generations, POST /v1/audio/speech) and service (GET /v1/models, /health,
/metrics). Every client mistake is a 4xx in OpenAI's error shape; the engine keeps serving whatever
a request does.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from diffserve.server.errors import install_error_handlers
from diffserve.server.guard import GuardMiddleware
from diffserve.server.routes import audio, images, service, videos
from diffserve.server.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "ServerState", "build_app"]


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for task in list(state.background):
            task.cancel()
        await run_in_threadpool(state.engine.shutdown)

    # /docs, /redoc and /openapi.json stay on: with --api-key the guard puts them behind it too.
    app = FastAPI(title="diffserve", version="0.1.0", lifespan=lifespan)
    app.state.diffserve = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, state=state)
    for family in (images, videos, audio, service):
        app.include_router(family.router(state))
    return app
