"""One place that sets up diffserve's log format and level (DIFFSERVE_LOG_LEVEL)."""

from __future__ import annotations

import logging
import sys

from diffserve.config import ENV_LOG_LEVEL

_configured = False


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record, not the one at setup (tests and
    notebooks swap it; a stale stream raises on write)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: str | None = None) -> None:
    global _configured
    logger = logging.getLogger("diffserve")
    if not _configured:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        _configured = True
    logger.setLevel((level or ENV_LOG_LEVEL).upper())
