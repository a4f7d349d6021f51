from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig
from diffserve.models.flux.pipeline_flux import FluxPipeline, get_flux_post_process_func

__all__ = ["FluxPipeline", "FluxTransformer2DModel", "FluxTransformerConfig", "get_flux_post_process_func"]
