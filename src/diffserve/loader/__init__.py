from diffserve.loader.diffusers_loader import DiffusersPipelineLoader
from diffserve.loader.utils import AutoWeightsLoader, load_weights_with_mapping
from diffserve.loader.weight_utils import WeightLoadingError, default_weight_loader

__all__ = [
    "AutoWeightsLoader",
    "DiffusersPipelineLoader",
    "WeightLoadingError",
    "default_weight_loader",
    "load_weights_with_mapping",
]
