"""Build the engine and the app for `diffserve serve`, and run them under uvicorn."""

from __future__ import annotations

import logging
import os
from typing import Any

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.engine.engine import DiffusionEngine
from diffserve.registry import DEMO_MODEL
from diffserve.server.app import ServerConfig, ServerState, build_app
from diffserve.server.jobs import VideoJobStore

logger = logging.getLogger(__name__)


def build_server(
    model: str = DEMO_MODEL,
    engine_kwargs: dict[str, Any] | None = None,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    batch_wait_ms: float = 5.0,
    request_timeout_s: float | None = 600.0,
    max_upload_mb: float = 20.0,
    jobs_dir: str | None = None,
    max_n: int = 8,
):
    od_config = OmniDiffusionConfig.from_kwargs(model, **(engine_kwargs or {}))
    engine = DiffusionEngine(od_config)
    config = ServerConfig(
        served_model_name=served_model_name or (DEMO_MODEL if model == DEMO_MODEL
                                                else os.path.basename(os.path.normpath(od_config.model))),
        api_key=api_key,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        request_timeout_s=request_timeout_s,
        max_n=max_n,
    )
    jobs = VideoJobStore(jobs_dir or os.path.abspath("diffserve_jobs")) if engine.spec.modality == "video" else None
    state = ServerState(AsyncDiffusionEngine(engine, max_queue=max_queue, batch_wait_ms=batch_wait_ms), config, jobs)
    return build_app(state), state


def run_server(app, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
