"""Errors the engine's layers share (kept apart so workers and the front end import them alike)."""


class RequestAborted(Exception):
    """A request stopped before it finished: its callers went away, it ran out of time, or the
    server is shutting down. Every rank raises it at the same step."""


class EngineUnavailable(RuntimeError):
    """The engine cannot take work now (loading, recovering from a failed worker, shutting down);
    `retry_after_s` says when to try again, if it will be able to."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
