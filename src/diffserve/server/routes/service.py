"""GET /v1/models[/{id}], /health and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from diffserve.server.common import adapter_model_names, check_model
from diffserve.server.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "diffserve", "modality": state.spec.modality}
        if check_model(state, name) is not None:  # a LoRA adapter on the served model
            card["parent"] = state.config.served_model_name
        return card

    @api.get("/v1/models")
    async def models():
        names = [*state.config.served_model_names, *adapter_model_names(state)]
        return {"object": "list", "data": [model_card(name) for name in names]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(state, model_id)
        return model_card(model_id)

    @api.get("/health")
    async def health():
        """200 while the engine takes work (ready, busy: some replica can); 503 while starting,
        recovering or draining, and when it failed. The body says which, why where it can, and how
        many replicas are healthy."""
        status = state.status
        # With data parallelism the server serves while any replica can; this says how many can.
        replicas = state.engine.replica_summary()
        if status in ("ready", "busy"):
            return {"status": status, "replicas": replicas}
        messages = {
            "starting": "the model is loading",
            "recovering": "the workers are restarting after a failure",
            "draining": "the server is shutting down",
            "failed": "the engine failed" + (f": {state.engine.load_error}" if state.engine.load_error else ""),
        }
        return JSONResponse(status_code=503, content={"status": status, "message": messages[status],
                                                      "replicas": replicas})

    @api.get("/metrics")
    async def metrics():
        state.metrics.observe_state(state)
        return Response(content=state.metrics.render(), media_type="text/plain; version=0.0.4")

    return api
