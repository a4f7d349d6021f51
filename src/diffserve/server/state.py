"""What every endpoint shares: the server's settings and its live state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.models.spec import SamplingSpec
from diffserve.server.jobs import VideoJobStore
from diffserve.server.metrics import ServerMetrics


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    request_timeout_s: float | None = 600.0
    max_n: int = 8
    max_images_per_edit: int = 8


class ServerState:
    def __init__(self, engine: AsyncDiffusionEngine, config: ServerConfig, jobs: VideoJobStore | None):
        self.engine = engine
        self.config = config
        self.jobs = jobs
        self.metrics = ServerMetrics()
        self.background: set[asyncio.Task] = set()
        self.job_tasks: dict[str, asyncio.Task] = {}
        engine.on_batch = self.metrics.observe_batch

    @property
    def spec(self) -> SamplingSpec:
        """What the served model takes and makes (its modality decides the endpoints it answers)."""
        return self.engine.spec
