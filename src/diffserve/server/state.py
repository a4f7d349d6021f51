"""What every endpoint shares: the server's settings and its live state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.models.spec import SamplingSpec
from diffserve.server.jobs import VideoJobStore
from diffserve.server.metrics import ServerMetrics


@dataclass
class ServerConfig:
    """Everything `diffserve serve` takes besides the engine's own settings."""

    # The names clients may send as `model`, first the one /v1/models lists first; empty: the
    # checkpoint folder's name and the model argument as given.
    served_model_names: list[str] = field(default_factory=list)
    # The engine's LoRA adapters (its lora_modules): listed by /v1/models as "<model>:<adapter>", a
    # name that selects the adapter at scale 1. Filled by build_server.
    lora_adapters: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_queue: int = 256
    batch_wait_ms: float = 5.0
    max_upload_bytes: int = 20 * 1024 * 1024
    # A client that announced a body but stops sending it gets a 408 after this long.
    body_timeout_s: float = 30.0
    # Synchronous requests (images, audio): answered 504 after this long from arrival.
    request_timeout_s: float | None = 600.0
    # ... and refused up front (400) when their estimated denoising time exceeds this; None: no limit.
    max_work_s: float | None = 600.0
    max_n: int = 8
    max_images_per_edit: int = 8
    # Video jobs: kept here; limited in time waiting and running (each from its own start); refused up
    # front when their estimated work exceeds the run limit; deleted with their files after the TTL;
    # new jobs refused while the stored videos exceed max_job_storage_bytes.
    jobs_dir: str | None = None
    job_queue_timeout_s: float | None = 3600.0
    job_timeout_s: float | None = 7200.0
    job_ttl_s: float | None = 7 * 24 * 3600.0
    max_job_storage_bytes: int | None = 10 * 1024**3
    # No denoise step for this long: the workers are declared wedged (killed and restarted).
    step_timeout_s: float | None = 600.0
    # SIGTERM: running work gets this long to finish before it is stopped with 503s.
    shutdown_grace_s: float = 30.0
    # (height, width, batch) shapes run once before serving, so compilation is paid at start.
    warmup: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]


class ServerState:
    """The config, the engine (which loads in the background: the server answers while it does), the
    job store, metrics and background tasks."""

    def __init__(self, engine: AsyncDiffusionEngine, config: ServerConfig, jobs: VideoJobStore):
        self.engine = engine
        self.config = config
        self.jobs = jobs
        self.metrics = ServerMetrics()
        self.background: set[asyncio.Task] = set()
        self.job_tasks: dict[str, asyncio.Task] = {}
        engine.on_batch = self.metrics.observe_batch
        engine.on_outputs = self.metrics.observe_outputs
        engine.on_step = self.metrics.observe_step

    @property
    def status(self) -> str:
        """starting | ready | busy | recovering | draining | failed."""
        return self.engine.status

    @property
    def spec(self) -> SamplingSpec:
        """What the served model takes and makes; EngineUnavailable (503) while it loads."""
        return self.engine.spec
