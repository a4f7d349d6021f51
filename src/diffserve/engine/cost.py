"""How much work a request is, before it runs.

A worker measures, once at load, what the estimate needs: its denoiser's parameter count, the width of
its self- and cross-attention layers, and the device's matmul throughput. The engine then estimates a
request's denoising FLOPs from its resolved parameters and the model's spec:

    per forward:  2 * params * S  +  4 * S^2 * self_attention_width  +  4 * S * S_text * cross_width
    forwards:     steps * (2 with CFG) * prompts * outputs per prompt

where S is the number of latent tokens (plus text tokens for joint attention). It ignores the text
encoders and the VAE, and real kernels reach a fraction of the measured matmul rate, so the seconds are
an estimate to warn and to bound work with, not a promise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from diffserve.engine.admission import cfg_enabled
from diffserve.models.spec import SamplingSpec
from diffserve.request import OmniDiffusionRequest

# Share of the measured matmul rate a whole denoising step reaches (attention, norms, launches).
EFFICIENCY = 0.5


@dataclass(frozen=True)
class CostProfile:
    params: int  # of the largest denoiser (Wan2.2's experts take turns)
    self_attention_width: int  # sum of heads * head_dim over its self/joint attention layers
    cross_attention_width: int  # the same over its cross-attention layers (keys are text or image tokens)
    flops_per_s: float  # measured matmul throughput of one rank in the model's dtype
    ranks: int  # ranks that share one request's work (TP, sequence and CFG parallel)
    device: str


def measure_matmul_flops(device, dtype) -> float:
    """The device's dense matmul throughput, FLOP/s, from a short timed run (tens of milliseconds)."""
    import torch

    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    repeats = 3
    for _ in range(2):  # warm-up
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / max(time.perf_counter() - start, 1e-9)


def profile_denoisers(denoisers, device, dtype, tp_size: int, ranks: int) -> CostProfile:
    """The cost profile of a pipeline's denoisers as built on this rank."""
    from diffserve.layers.attention import Attention

    largest = max(denoisers, key=lambda m: sum(p.numel() for p in m.parameters()))
    params = sum(p.numel() for p in largest.parameters())
    widths = {True: 0, False: 0}
    for module in largest.modules():
        if isinstance(module, Attention):  # cross-attention keeps its keys whole under SP
            widths[module.skip_sequence_parallel] += module.num_heads * module.head_size
    # Under TP a rank holds a share of the parameters and heads; the estimate is for the whole model.
    return CostProfile(params * tp_size, widths[False] * tp_size, widths[True] * tp_size,
                       measure_matmul_flops(device, dtype), ranks, device.type)


def latent_tokens(spec: SamplingSpec, req: OmniDiffusionRequest) -> int:
    """Tokens one sample's denoiser sees: one per size_multiple^2 pixels per latent frame, plus those of
    input images that join the sequence (an editing model's reference tokens)."""
    sp = req.sampling_params
    if spec.fixed_tokens is not None:
        return spec.fixed_tokens
    m = spec.size_multiple
    frames = 1
    if sp.num_frames is not None and spec.frames_multiple:
        frames = (sp.num_frames - 1) // spec.frames_multiple + 1
    tokens = (sp.height // m) * (sp.width // m) * frames
    if spec.images is not None and spec.images.tokens_in_sequence:
        for image in req.prompts[0].images or ():  # admission made every prompt's images one size
            width, height = spec.input_image_size(image.size, sp) or image.size
            tokens += (height // m) * (width // m)
    return tokens


def activation_tokens(spec: SamplingSpec, req: OmniDiffusionRequest) -> int:
    """The tokens a request puts through each transformer call: its samples x latent tokens x CFG branches
    (what a step's activation memory grows with; step batching caps a batch by it)."""
    branches = 2 if cfg_enabled(spec, req.sampling_params) else 1
    return latent_tokens(spec, req) * req.batch_size * branches


def estimate_flops(spec: SamplingSpec, profile: CostProfile, req: OmniDiffusionRequest) -> float:
    sp = req.sampling_params
    sized = spec.fixed_tokens is not None or (sp.height is not None and sp.width is not None)
    if not sized or sp.num_inference_steps is None:
        return 0.0  # a size or step count the model decides itself (the diffusers adapter): unknown
    text = sp.max_sequence_length or 0
    tokens = latent_tokens(spec, req) + (text if profile.cross_attention_width == 0 else 0)
    per_forward = (2 * profile.params * tokens + 4 * tokens**2 * profile.self_attention_width
                   + 4 * tokens * text * profile.cross_attention_width)
    forwards = sp.num_inference_steps * (2 if cfg_enabled(spec, sp) else 1) * req.batch_size
    return per_forward * forwards


def estimate_seconds(spec: SamplingSpec, profile: CostProfile, req: OmniDiffusionRequest) -> float:
    rate = profile.flops_per_s * EFFICIENCY * profile.ranks
    return estimate_flops(spec, profile, req) / rate


def describe_request(spec: SamplingSpec, req: OmniDiffusionRequest) -> str:
    """"832x480, 81 frames, 50 steps, CFG, 2 outputs": what makes a request large, in the user's words."""
    sp = req.sampling_params
    parts = []
    if "height" in spec.params:
        parts.append(f"{sp.width}x{sp.height}")
    if sp.num_frames is not None:
        parts.append(f"{sp.num_frames} frames")
    parts.append(f"{sp.num_inference_steps} steps")
    if cfg_enabled(spec, sp):
        parts.append("CFG")
    if req.batch_size > 1:
        parts.append(f"{req.batch_size} outputs")
    return ", ".join(parts)


def smaller_request_hint(spec: SamplingSpec) -> str:
    knobs = [k for k in ("height", "width", "num_frames", "num_inference_steps") if k in spec.params]
    return f"lower {', '.join(knobs)}" if knobs else "ask for fewer outputs"
