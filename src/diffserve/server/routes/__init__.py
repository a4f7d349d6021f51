"""The HTTP endpoints, one module per family; each exposes `router(state) -> APIRouter`."""
