"""A toy pipeline with every component kind, for the offload schedule tests (CPU, float32)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from diffserve.models.interface import SupportsComponentDiscovery

DIM = 8


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, DIM))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.linear(hidden_states)) * self.scale


class ToyDiT(nn.Module):
    _repeated_blocks: ClassVar[list[str]] = ["ToyBlock"]

    def __init__(self, depth: int = 5):
        super().__init__()
        self.proj_in = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(depth))
        self.proj_out = nn.Linear(DIM, DIM)
        # Blocks this call leaves out, as a step cache does on a cached step.
        self.skip: set[int] = set()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(hidden_states)
        for i, block in enumerate(self.blocks):
            if i not in self.skip:
                h = block(h)
        return self.proj_out(h)


class ToyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, DIM)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).mean(1)


class ToyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(DIM, 3)
        self.encoder = nn.Linear(3, DIM)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class ToyPipeline(nn.Module, SupportsComponentDiscovery):
    _dit_modules: ClassVar[list[str]] = ["transformer", "transformer_2"]
    _encoder_modules: ClassVar[list[str]] = ["text_encoder"]
    _vae_modules: ClassVar[list[str]] = ["vae"]

    def __init__(self, depth: int = 5, experts: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.text_encoder = ToyEncoder()
        self.transformer = ToyDiT(depth)
        self.transformer_2 = ToyDiT(depth) if experts == 2 else None
        if experts == 1:
            self._dit_modules = ["transformer"]
        self.vae = ToyVAE()
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor, steps: int = 2, image: torch.Tensor | None = None) -> torch.Tensor:
        """Encode, (encode an image), denoise `steps` times (the second expert for the second half),
        decode, as a real pipeline's stages do; inputs are made on the host, as pipelines do."""
        latents = self.text_encoder(ids.to(self.text_encoder.embed.weight.device))
        if image is not None:
            latents = latents + self.vae.encode(image)
        for i in range(steps):
            dit = self.transformer_2 if self.transformer_2 is not None and i >= steps // 2 else self.transformer
            latents = dit(latents)
        return self.vae.decode(latents)


def ids() -> torch.Tensor:
    return torch.tensor([[1, 2, 3], [4, 5, 6]])
