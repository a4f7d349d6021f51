"""Tiny random-weight checkpoints of the built-in demo model (DiffservePixelDiTPipeline).

Built with the training script's own reference model and saved by the same function training uses,
so the layout is exactly the shipped one; only the sizes are tiny.
"""

from __future__ import annotations

import torch

from diffserve.testing.components import perturb_


def build_tiny_demo_dit(path: str, seed: int = 0, **config_overrides) -> str:
    """A 2-block DiT (hidden 64, 4 heads) and a 1-layer text encoder (hidden 32); `config_overrides`
    replace DiT config fields. `full_size=True` builds the shipped model's shapes with random weights
    (for speed tests)."""
    from diffserve.models.demo_dit.configs import DemoDiTConfig
    from diffserve.demo.reference import (
        ReferenceDiT,
        ReferenceTextEncoder,
        default_text_encoder_config,
        save_pipeline,
    )

    full_size = config_overrides.pop("full_size", False)
    torch.manual_seed(seed)
    if full_size:
        text_config = default_text_encoder_config()
        dit_config = DemoDiTConfig(**config_overrides)
    else:
        text_config = default_text_encoder_config(hidden_size=32, num_layers=1, num_attention_heads=2)
        dit_config = DemoDiTConfig(
            **{
                "num_layers": 2,
                "num_attention_heads": 4,
                "attention_head_dim": 16,
                "text_dim": 32,
                "rope_axes_dim": (8, 8),
                **config_overrides,
            }
        )
    transformer, text_encoder = ReferenceDiT(dit_config), ReferenceTextEncoder(text_config)
    # adaLN-Zero starts every gate at zero; perturbing makes every parameter matter to the output.
    generator = torch.Generator().manual_seed(seed + 1)
    perturb_(transformer, 0.05, generator)
    perturb_(text_encoder, 0.05, generator)
    return save_pipeline(path, transformer, text_encoder)
