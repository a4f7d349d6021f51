"""Wan2.1 / Wan2.2 video models: text-to-video, image-to-video and TI2V-5B."""

from diffserve.models.wan.pipeline_wan import WanPipeline
from diffserve.models.wan.pipeline_wan_i2v import WanImageToVideoPipeline
from diffserve.models.wan.wan_transformer import WanTI2VTransformer3DModel, WanTransformer3DModel, WanTransformerConfig

__all__ = [
    "WanImageToVideoPipeline",
    "WanPipeline",
    "WanTI2VTransformer3DModel",
    "WanTransformer3DModel",
    "WanTransformerConfig",
]
