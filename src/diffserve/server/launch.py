"""Build the engine and the app for `diffserve serve`, and run them under uvicorn."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.async_engine import AsyncDiffusionEngine
from diffserve.engine.engine import DiffusionEngine, warm_up
from diffserve.registry import DEMO_MODEL, resolve_model
from diffserve.server.protocol import SIZE_PATTERN
from diffserve.server.app import ServerConfig, ServerState, build_app
from diffserve.server.jobs import VideoJobStore

logger = logging.getLogger(__name__)


def served_names(model: str, resolved_path: str, given: list[str]) -> list[str]:
    """The names a client may use: the given ones (default: the checkpoint folder's name, "demo" for
    the demo model), then the model argument exactly as passed to `serve` (a path or hub id)."""
    names = list(given) or [DEMO_MODEL if model == DEMO_MODEL else os.path.basename(os.path.normpath(resolved_path))]
    return list(dict.fromkeys([*names, model]))


def build_server(model: str = DEMO_MODEL, engine_kwargs: dict[str, Any] | None = None,
                 config: ServerConfig | None = None):
    """The app and its state. The config and the model are checked here (a bad flag or a missing model
    fails before the server listens); the weights load in the background once it listens, while
    /health says "starting" and the API answers 503 with Retry-After."""
    config = dataclasses.replace(config or ServerConfig())
    engine_kwargs = dict(engine_kwargs or {})
    # Per-request progress bars would fill the server log; progress is in /metrics and video jobs.
    engine_kwargs.setdefault("disable_progress_bar", True)
    od_config = OmniDiffusionConfig.from_kwargs(model, **engine_kwargs)
    resolve_model(od_config)
    config.served_model_names = served_names(model, od_config.model, config.served_model_names)
    config.lora_adapters = sorted(od_config.lora_modules)
    jobs = VideoJobStore(config.jobs_dir or os.path.abspath("diffserve_jobs"), ttl_s=config.job_ttl_s)

    replicas = od_config.parallel_config.data_parallel_size

    def load(replica: int) -> DiffusionEngine:
        engine = DiffusionEngine(od_config, replica=replica)
        logger.info("loaded %r (%s)%s", config.served_model_name, engine.spec.modality,
                    f" on replica {replica} of {replicas}" if replicas > 1 else "")
        return engine

    # One scheduler, one runner per data-parallel replica: each batch goes to a free replica.
    engine = AsyncDiffusionEngine([functools.partial(load, r) for r in range(replicas)],
                                  max_queue=config.max_queue, batch_wait_ms=config.batch_wait_ms,
                                  step_timeout_s=config.step_timeout_s,
                                  warmup=(lambda e: warm_up(e, config.warmup)) if config.warmup else None)
    state = ServerState(engine, config, jobs)
    return build_app(state), state


def parse_warmup(text: str) -> list[tuple[int, int, int]]:
    """"1024x1024,512x512:4" -> [(height, width, batch)]: each size, and the batch size after ':'
    (default 1)."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        size, _, batch = item.partition(":")
        match = SIZE_PATTERN.fullmatch(size)
        if match is None or (batch and not batch.isdigit()) or (batch and int(batch) < 1):
            raise ValueError(f"--warmup takes WIDTHxHEIGHT[:BATCH] items separated by commas, got {item!r}")
        shapes.append((int(match.group(2)), int(match.group(1)), int(batch or 1)))
    return shapes


def run_server(app, state: ServerState, host: str, port: int, log_level: str = "info") -> None:
    """uvicorn, with SIGTERM/SIGINT draining the engine first: admission stops, queued requests get
    503, the running batch gets `shutdown_grace_s`, then the workers stop."""
    import uvicorn

    grace = state.config.shutdown_grace_s

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.engine.drain(grace)
            super().handle_exit(sig, frame)

    # uvicorn waits a little longer than the grace so the handlers answer (503) before it closes them.
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   timeout_graceful_shutdown=grace + 5))
    state.engine.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run()
