"""Wan2.1 / Wan2.2 video models: text-to-video, image-to-video and TI2V-5B."""

from diffserve.models.wan.pipeline_wan import WanPipeline, get_wan_post_process_func
from diffserve.models.wan.pipeline_wan_i2v import WanImageToVideoPipeline, get_wan_i2v_post_process_func
from diffserve.models.wan.wan_transformer import WanTI2VTransformer3DModel, WanTransformer3DModel, WanTransformerConfig

__all__ = [
    "WanImageToVideoPipeline",
    "WanPipeline",
    "WanTI2VTransformer3DModel",
    "WanTransformer3DModel",
    "WanTransformerConfig",
    "get_wan_i2v_post_process_func",
    "get_wan_post_process_func",
]
