from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig
from diffserve.models.flux.pipeline_flux import FluxPipeline

__all__ = ["FluxPipeline", "FluxTransformer2DModel", "FluxTransformerConfig"]
