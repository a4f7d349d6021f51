"""The building blocks every model is made of. Models build from these (and never from bare
nn.Linear for their large projections), so tensor parallelism, attention backends, sequence
parallelism and, later, quantization and LoRA apply to every model alike."""

from diffserve.layers.adaln import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    AdaLNModulation,
    modulate,
)
from diffserve.layers.attention import Attention
from diffserve.layers.embeddings import TimeTextEmbedding, TwoLayerMLP, timestep_embedding
from diffserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from diffserve.layers.mlp import FeedForward
from diffserve.layers.norm import LayerNorm, RMSNorm
from diffserve.layers.rope import MultiAxisRoPE, apply_rotary_emb

__all__ = [
    "AdaLNModulation",
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "Attention",
    "ColumnParallelLinear",
    "FeedForward",
    "LayerNorm",
    "MergedColumnParallelLinear",
    "MultiAxisRoPE",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RowParallelLinear",
    "TimeTextEmbedding",
    "TwoLayerMLP",
    "apply_rotary_emb",
    "modulate",
    "timestep_embedding",
]
