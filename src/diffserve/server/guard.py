"""API key, body size limit and request metrics, as plain ASGI middleware."""

from __future__ import annotations

import time

from diffserve.server.errors import error_response
from diffserve.server.state import ServerConfig, ServerState


class GuardMiddleware:
    """API key, body size limit and request metrics, as plain ASGI.

    (Starlette's BaseHTTPMiddleware would hide the client's disconnect from the endpoints, which
    need it to abort work nobody waits for.)
    """

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config, metrics = self.state.config, self.state.metrics
        start = time.monotonic()
        path = scope["path"]
        endpoint = path
        if path.startswith("/v1/videos/"):
            endpoint = "/v1/videos/{id}" + ("/content" if path.endswith("/content") else "")
        status = {"code": 500}
        received = {"bytes": 0, "too_large": False}

        async def send_and_record(message):
            if received["too_large"]:
                return  # the app's answer to a cut-off body is replaced by the 413 below
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > config.max_upload_bytes:
                    received["too_large"] = True
                    return {"type": "http.disconnect"}  # stop the app reading; it must not see the rest
            return message

        refusal = self._refusal(scope, config)
        if refusal is not None:
            await refusal(scope, receive, send_and_record)
        else:
            try:
                await self.app(scope, receive_limited, send_and_record)
            except Exception:
                if not received["too_large"]:
                    raise
            if received["too_large"]:
                received["too_large"] = False
                limit = config.max_upload_bytes
                await error_response(413, f"request body exceeds the limit of {limit} bytes")(
                    scope, receive, send_and_record
                )
        metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
        if endpoint.startswith("/v1/") and status["code"] < 400:
            metrics.e2e_latency.labels(endpoint=endpoint).observe(time.monotonic() - start)
        metrics.queue_depth.set(self.state.engine.queue_depth)

    @staticmethod
    def _refusal(scope, config: ServerConfig):
        """An error response for what can be refused from the headers alone, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"].startswith("/v1/") and config.api_key is not None:
            auth = headers.get("authorization", "")
            if auth != f"Bearer {config.api_key}":
                message = "missing API key" if not auth else "invalid API key"
                return error_response(401, f"{message}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, f"invalid Content-Length {length!r}")
            if int(length) > config.max_upload_bytes:
                return error_response(
                    413, f"request body of {int(length)} bytes exceeds the limit of {config.max_upload_bytes} bytes"
                )
        return None
