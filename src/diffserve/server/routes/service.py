"""GET /v1/models[/{id}], /health and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from diffserve.server.common import check_model
from diffserve.server.errors import error_response
from diffserve.server.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    def model_card() -> dict:
        return {"id": state.config.served_model_name, "object": "model", "created": 0, "owned_by": "diffserve",
                "modality": state.spec.modality}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id}")
    async def model(model_id: str):
        check_model(state, model_id)
        return model_card()

    @api.get("/health")
    async def health():
        if not state.engine.is_healthy():
            return error_response(503, "the engine is not running (a worker died or it was shut down)")
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics():
        state.metrics.queue_depth.set(state.engine.queue_depth)
        return Response(content=state.metrics.render(), media_type="text/plain; version=0.0.4")

    return api
