"""The demo model's text encoder: word embeddings + learned positions + a few pre-norm transformer
layers. Small enough to train with the denoiser; it gives each word its context, which is what binds
"red" to "circle" and not to "square". Numerically equal to `reference.ReferenceTextEncoder`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffserve.layers.mlp import FeedForward
from diffserve.layers.norm import LayerNorm
from diffserve.loader.utils import load_weights_with_mapping
from diffserve.models.demo_dit.configs import DemoTextEncoderConfig
from diffserve.models.demo_dit.demo_dit_transformer import STACKED_PARAMS_MAPPING, WEIGHT_RENAMES, DemoAttention


class DemoTextEncoderLayer(nn.Module):
    def __init__(self, config: DemoTextEncoderConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = LayerNorm(dim, eps=config.layer_norm_eps, elementwise_affine=True)
        self.attn = DemoAttention(dim, config.num_attention_heads, config.head_dim, qk_norm=False)
        self.norm2 = LayerNorm(dim, eps=config.layer_norm_eps, elementwise_affine=True)
        self.ff = FeedForward(dim, int(dim * config.mlp_ratio), act="gelu_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class DemoTextEncoder(nn.Module):
    """Token ids [B, L] -> (hidden states [B, L, D], pooled [B, D] taken at the leading [BOS])."""

    def __init__(self, config: DemoTextEncoderConfig, *, od_config=None):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Parameter(torch.empty(config.max_length, config.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DemoTextEncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=True)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the text encoder's {self.config.max_length}")
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        return x, x[:, 0]

    def load_weights(self, weights) -> set[str]:
        return load_weights_with_mapping(self, weights, STACKED_PARAMS_MAPPING, WEIGHT_RENAMES)
