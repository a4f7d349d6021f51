"""The demo model in plain PyTorch: what `scripts/train_demo_model.py` trains, and the conformance
reference for our port (`demo_dit_transformer.py`, `text_encoder.py`, `pipeline_demo_dit.py`).

Written independently of `diffserve.layers` on purpose (nn.Linear, nn.LayerNorm, its own RoPE,
F.scaled_dot_product_attention, a hand-written Euler sampler), so the conformance test compares two
implementations, not one with itself. Parameter names follow diffusers' conventions (`to_q`/`to_k`/
`to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`); our port maps them to its fused layers on load.

Also here: saving and loading the checkpoint folder, which needs neither diffusers nor transformers to
write (the GPU training machine has no diffusers).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffserve.models.spec import DEFAULTS_KEY
from diffserve.models.demo_dit.configs import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SHIFT,
    DemoDiTConfig,
    DemoTextEncoderConfig,
)
from diffserve.demo.scenes import MAX_TEXT_LENGTH, VOCAB, save_tokenizer

PIPELINE_CLASS_NAME = "DiffservePixelDiTPipeline"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "model.safetensors"


# -- building blocks ---------------------------------------------------------------------------------


class GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HeadRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [S, sum(axes_dim) / 2]: one angle per (position, frequency) for integer
    positions ids [S, n_axes]; angles in float64, tables in float32."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(torch.outer(ids[:, axis].to(torch.float64), inv_freq))
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, H, S, D]: each pair (x[2i], x[2i+1]) rotated by its angle, in float32. (Real arithmetic,
    not complex numbers: torch.compile's Inductor does not generate code for complex tensors.)"""
    cos, sin = tables
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q = HeadRMSNorm(dim // heads) if qk_norm else None
        self.norm_k = HeadRMSNorm(dim // heads) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = (
            proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v)
        )
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


# -- the text encoder --------------------------------------------------------------------------------


class TextEncoderLayer(nn.Module):
    def __init__(self, config: DemoTextEncoderConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = SelfAttention(dim, config.num_attention_heads, qk_norm=False)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.ff = FeedForward(dim, int(dim * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class ReferenceTextEncoder(nn.Module):
    """Token ids [B, L] -> (hidden states [B, L, D], pooled [B, D] = the [BOS] position)."""

    def __init__(self, config: DemoTextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.hidden_size))
        self.layers = nn.ModuleList(TextEncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        return x, x[:, 0]


# -- the denoiser ------------------------------------------------------------------------------------


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [N, dim] of t * 1000 (t in [0, 1]), cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class AdaLNZero(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        return [c[:, None] for c in self.linear(F.silu(cond)).chunk(6, dim=-1)]


class DiTBlock(nn.Module):
    """adaLN-Zero block over the joint [text; image] sequence."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = AdaLNZero(dim)
        self.attn = SelfAttention(dim, heads, qk_norm=True)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(cond)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn(h, rope)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h)


class ReferenceDiT(nn.Module):
    """Velocity v = noise - image for images [B, C, H, W] at flow time t [B] in [0, 1]."""

    def __init__(self, config: DemoDiTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.x_embedder = nn.Linear(config.patch_channels, dim)
        self.context_embedder = nn.Linear(config.text_dim, dim)
        self.time_embed = MLPEmbedder(256, dim)
        self.text_embed = MLPEmbedder(config.text_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(dim, config.num_attention_heads, config.mlp_ratio) for _ in range(config.num_layers)
        )
        # Final adaLN: its linear emits (scale, shift), stored as norm_out.linear.
        self.norm_out = nn.ModuleDict({"linear": nn.Linear(dim, 2 * dim)})
        self.proj_out = nn.Linear(dim, config.patch_channels)
        self.initialize()

    def initialize(self) -> None:
        """DiT's adaLN-Zero init: every block starts as the identity and the output as zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.norm_out["linear"], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for embedder in (self.time_embed, self.text_embed):
            nn.init.normal_(embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedder.linear_2.weight, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        b, c, h, w = images.shape
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.in_channels
        b = tokens.shape[0]
        x = tokens.reshape(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, height, width)

    def forward(self, images: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        _, _, height, width = images.shape
        p = self.config.patch_size
        rows, cols = torch.meshgrid(
            torch.arange(height // p, device=images.device),
            torch.arange(width // p, device=images.device),
            indexing="ij",
        )
        # Text tokens sit at position (0, 0): they carry their order from the text encoder.
        ids = torch.cat(
            [torch.zeros(text.shape[1], 2, device=images.device), torch.stack([rows, cols], -1).reshape(-1, 2)]
        )
        rope = rope_tables(ids, self.config.rope_axes_dim, self.config.rope_theta)

        cond = self.time_embed(timestep_features(t).to(images.dtype)) + self.text_embed(pooled)
        x = torch.cat([self.context_embedder(text), self.x_embedder(self.patchify(images))], dim=1)
        for block in self.transformer_blocks:
            x = block(x, cond, rope)
        x = x[:, text.shape[1] :]
        scale, shift = self.norm_out["linear"](F.silu(cond)).chunk(2, dim=-1)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.unpatchify(self.proj_out(x), height, width)


# -- sampling ----------------------------------------------------------------------------------------


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """num_steps + 1 noise levels from 1 to 0, shifted like diffusers' FlowMatchEulerDiscreteScheduler."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def initial_noise(seeds: list[int], per_seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One CPU generator per seed, as diffusers' randn_tensor with a list of generators."""
    return torch.cat([torch.randn((per_seed, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


@dataclass
class ReferencePipeline:
    transformer: ReferenceDiT
    text_encoder: ReferenceTextEncoder
    tokenizer: object  # transformers PreTrainedTokenizerFast
    shift: float = DEFAULT_SHIFT
    default_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from diffserve.models.demo_dit.captions import tokenize

        ids = tokenize(self.tokenizer, prompts, self.text_encoder.config.max_length).to(self.device)
        return self.text_encoder(ids)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        negative_prompts: list[str | None] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        outputs_per_prompt: int = 1,
    ) -> torch.Tensor:
        """Float images [len(prompts) * outputs_per_prompt, 3, H, W] in [0, 1], prompt-major."""
        size = self.transformer.config.sample_size
        height, width = height or size, width or size
        steps = num_inference_steps or self.default_steps
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        k = outputs_per_prompt
        text, pooled = (e.repeat_interleave(k, 0) for e in self.encode(prompts))
        do_cfg = scale > 1
        if do_cfg:
            negatives = [n or "" for n in (negative_prompts or [None] * len(prompts))]
            neg_text, neg_pooled = (e.repeat_interleave(k, 0) for e in self.encode(negatives))
        x = initial_noise(seeds, k, (self.transformer.config.in_channels, height, width)).to(self.device)
        sigmas = flow_sigmas(steps, self.shift).to(self.device)
        for i in range(steps):
            t = sigmas[i].expand(x.shape[0])
            v = self.transformer(x, t, text, pooled)
            if do_cfg:
                v_neg = self.transformer(x, t, neg_text, neg_pooled)
                v = v_neg + scale * (v - v_neg)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return (x.float() / 2 + 0.5).clamp(0, 1)


# -- the checkpoint folder ---------------------------------------------------------------------------


def scheduler_config(shift: float) -> dict:
    """diffusers' FlowMatchEulerDiscreteScheduler config, written by hand (no diffusers here)."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.42.1",
        "num_train_timesteps": 1000,
        "shift": float(shift),
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _save_weights(module: nn.Module, path: str, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    state = {name: t.detach().to("cpu", dtype).contiguous() for name, t in module.state_dict().items()}
    save_file(state, path, metadata={"format": "pt"})


def save_pipeline(
    folder: str,
    transformer: ReferenceDiT,
    text_encoder: ReferenceTextEncoder,
    *,
    weights_dtype: torch.dtype = torch.float32,
    shift: float = DEFAULT_SHIFT,
    default_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
) -> str:
    """Write the diffusers-style folder: model_index.json, transformer/, text_encoder/, tokenizer/,
    scheduler/. The sampling defaults go into model_index.json's `_diffserve_defaults`, which the engine
    uses when a request gives none."""
    from diffserve import __version__

    _write_json(
        os.path.join(folder, "model_index.json"),
        {
            "_class_name": PIPELINE_CLASS_NAME,
            "_diffserve_version": __version__,
            "transformer": ["diffserve", transformer.config._class_name],
            "text_encoder": ["diffserve", text_encoder.config._class_name],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            DEFAULTS_KEY: {"num_inference_steps": int(default_steps), "guidance_scale": float(default_guidance_scale)},
        },
    )
    for name, module, weights_file in (
        ("transformer", transformer, TRANSFORMER_WEIGHTS),
        ("text_encoder", text_encoder, TEXT_ENCODER_WEIGHTS),
    ):
        module.config.save(os.path.join(folder, name))
        _save_weights(module, os.path.join(folder, name, weights_file), weights_dtype)
    save_tokenizer(os.path.join(folder, "tokenizer"), text_encoder.config.max_length)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_config(shift))
    return folder


def _load_weights(module: nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    state = load_file(path)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(module).__name__}: missing {missing}, unexpected {unexpected}")


def load_pipeline(
    folder: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ReferencePipeline:
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        shift = json.load(f)["shift"]
    transformer = ReferenceDiT(DemoDiTConfig.from_pretrained(os.path.join(folder, "transformer")))
    text_encoder = ReferenceTextEncoder(DemoTextEncoderConfig.from_pretrained(os.path.join(folder, "text_encoder")))
    _load_weights(transformer, os.path.join(folder, "transformer", TRANSFORMER_WEIGHTS))
    _load_weights(text_encoder, os.path.join(folder, "text_encoder", TEXT_ENCODER_WEIGHTS))
    return ReferencePipeline(
        transformer=transformer.to(device, dtype).eval(),
        text_encoder=text_encoder.to(device, dtype).eval(),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(os.path.join(folder, "tokenizer")),
        shift=shift,
        default_steps=index.get(DEFAULTS_KEY, {}).get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS),
        default_guidance_scale=index.get(DEFAULTS_KEY, {}).get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
    )


def default_text_encoder_config(**overrides) -> DemoTextEncoderConfig:
    return DemoTextEncoderConfig(vocab_size=len(VOCAB), max_length=MAX_TEXT_LENGTH, **overrides)
