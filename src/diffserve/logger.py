"""One place that sets up diffserve's log format and level (DIFFSERVE_LOG_LEVEL)."""

from __future__ import annotations

import logging

from diffserve.config import ENV_LOG_LEVEL

_configured = False


def configure_logging(level: str | None = None) -> None:
    global _configured
    logger = logging.getLogger("diffserve")
    if not _configured:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        _configured = True
    logger.setLevel((level or ENV_LOG_LEVEL).upper())
