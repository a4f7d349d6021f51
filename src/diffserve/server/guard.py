"""API key, body size and read-time limits, and request metrics, as plain ASGI middleware.

(Starlette's BaseHTTPMiddleware would hide the client's disconnect from the endpoints, which need it
to abort work nobody waits for.)
"""

from __future__ import annotations

import asyncio
import hmac
import time

from diffserve.server.errors import error_response
from diffserve.server.state import ServerConfig, ServerState

# Reachable without the API key: load balancers probe health, Prometheus scrapes metrics.
OPEN_PATHS = ("/health", "/metrics")


class BodyTimeout(Exception):
    """The client stopped sending its body (fewer bytes than it announced)."""


def route_label(scope) -> str:
    """The route template the app matched ("/v1/videos/{video_id}", set in the scope by the router),
    or "unmatched": metrics labels must not grow with every path a client invents."""
    return getattr(scope.get("route"), "path", "unmatched")


def authorized(header: str, api_key: str) -> bool:
    """`Authorization: Bearer <key>`, the scheme in any case, compared in constant time."""
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class GuardMiddleware:
    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config, metrics = self.state.config, self.state.metrics
        start = time.monotonic()
        status = {"code": 500}
        received = {"bytes": 0, "refused": None}

        async def send_and_record(message):
            if received["refused"] is not None:
                return  # the app's answer to a cut-off body is replaced by the refusal below
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def receive_limited():
            try:
                message = await asyncio.wait_for(receive(), timeout=config.body_timeout_s)
            except asyncio.TimeoutError:
                received["refused"] = error_response(
                    408, f"the request body did not arrive within {config.body_timeout_s:.0f} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > config.max_upload_bytes:
                    received["refused"] = error_response(
                        413, f"request body exceeds the limit of {config.max_upload_bytes} bytes")
                    return {"type": "http.disconnect"}  # stop the app reading; it must not see the rest
            return message

        refusal = self._refusal(scope, config)
        if refusal is not None:
            await refusal(scope, receive, send_and_record)
            endpoint = "refused"
        else:
            try:
                await self.app(scope, receive_limited, send_and_record)
            except Exception:
                if received["refused"] is None:
                    raise
            if received["refused"] is not None:
                refused, received["refused"] = received["refused"], None
                await refused(scope, receive, send_and_record)
            endpoint = route_label(scope)
        metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
        if endpoint.startswith("/v1/") and status["code"] < 400:
            metrics.e2e_latency.labels(endpoint=endpoint).observe(time.monotonic() - start)
        metrics.queue_depth.set(self.state.engine.queue_depth)

    @staticmethod
    def _refusal(scope, config: ServerConfig):
        """An error response for what can be refused from the headers alone, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if config.api_key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            if not authorized(auth, config.api_key):
                message = "missing API key" if not auth else "invalid API key"
                return error_response(401, f"{message}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not length.isascii() or not length.isdigit():
                return error_response(400, f"invalid Content-Length {length!r}")
            if int(length) > config.max_upload_bytes:
                return error_response(
                    413, f"request body of {int(length)} bytes exceeds the limit of {config.max_upload_bytes} bytes"
                )
        return None
