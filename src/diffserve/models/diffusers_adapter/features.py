"""What the diffusers adapter gives and refuses, checked at engine start (no torch here).

The adapter runs diffusers' own pipeline code, so the engine features that work by replacing model
code cannot apply: tensor and sequence parallelism shard diffserve's layers, CFG parallel splits
diffserve's denoise loop, HSDP and VAE patch parallel wrap diffserve's pipelines across ranks,
TeaCache reads the modulated input that diffserve's transformers declare, FP8 quantization and
LoRA adapters live in diffserve's linear layers, and CPU offload moves weights under diffserve's
pipelines, which place their inputs on the execution device. Those settings are refused
here, naming the native pipelines (from the registry) that have them. What diffusers itself can do is
mapped: regional compile, VAE tiling and slicing, Cache-DiT (for the pipelines cache-dit knows) and the attention
backends sdpa and flash_attn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffserve.config import OmniDiffusionConfig

# Attention backends the adapter maps onto diffusers' (None: diffserve's default, sdpa).
ADAPTER_ATTENTION_BACKENDS = (None, "sdpa", "flash_attn")

# What the adapter serves, for `diffserve models` and the docs.
ADAPTER_FEATURES = (
    "regional torch.compile (diffusers models that declare _repeated_blocks)",
    "vae_use_tiling (the VAE's own enable_tiling)",
    "vae_use_slicing (the VAE's own enable_slicing)",
    "cache_backend='cache_dit' (the pipelines cache-dit supports)",
    "attention_backend sdpa or flash_attn (models on diffusers' attention dispatcher)",
    "batching, seeds, progress, abort between steps, the HTTP server and the CLI",
)
ADAPTER_REFUSED = ("tensor/sequence/CFG parallel, HSDP, VAE patch parallel, tea_cache, fp8 quantization, "
                   "LoRA adapters, CPU offload, CUDA graphs, sage_attn, cudnn_fp8")


def refused_settings(od_config: "OmniDiffusionConfig") -> list[str]:
    """The settings of `od_config` that the adapter cannot honour, as the user wrote them."""
    pc = od_config.parallel_config
    refused = [
        f"{name}={getattr(pc, name)}"
        for name in ("tensor_parallel_size", "ulysses_degree", "ring_degree", "cfg_parallel_size",
                     "vae_patch_parallel_size")
        if getattr(pc, name) > 1
    ]
    if pc.use_hsdp:
        refused.append("use_hsdp=True")
    if od_config.cache_backend == "tea_cache":
        refused.append("cache_backend='tea_cache'")
    if od_config.quantization is not None:
        refused.append(f"quantization={od_config.quantization!r}")
    if od_config.lora_modules:
        refused.append(f"lora_modules ({', '.join(sorted(od_config.lora_modules))})")
    offload = ("enable_cpu_offload", "enable_layerwise_offload")
    refused += [f"{name}=True" for name in offload if getattr(od_config, name)]
    if od_config.cuda_graphs:  # not run on diffusers' models
        refused.append("cuda_graphs=True")
    if od_config.attention_backend not in ADAPTER_ATTENTION_BACKENDS:
        refused.append(f"attention_backend={od_config.attention_backend!r}")
    return refused


def check_adapter_features(od_config: "OmniDiffusionConfig") -> None:
    """ValueError naming every setting the adapter cannot give and the native pipelines that have it."""
    from diffserve.registry import supported_models

    refused = refused_settings(od_config)
    if not refused:
        return
    raise ValueError(
        f"{', '.join(refused)}: not available for {od_config.model_class_name} through the diffusers adapter, which "
        f"runs diffusers' own pipeline code (the adapter gives regional compile, vae_use_tiling, vae_use_slicing, "
        f"cache_backend='cache_dit' and attention_backend sdpa/flash_attn). diffserve's native pipelines have these "
        f"features: {', '.join(supported_models())} (VAE patch parallel where diffserve tiles their VAE)"
    )


def describe_models() -> str:
    """`diffserve models`: the native pipelines, then what every other diffusers pipeline gets."""
    from diffserve.registry import supported_models

    lines = ["Native pipelines (every engine feature):"]
    lines += [f"  {name}" for name in supported_models()]
    lines += [
        "",
        "Any other pipeline class of the installed diffusers runs through the diffusers adapter "
        "(--backend diffusers forces it for a native one), with:",
    ]
    lines += [f"  {feature}" for feature in ADAPTER_FEATURES]
    lines.append(f"  not: {ADAPTER_REFUSED} (a clear error at start)")
    return "\n".join(lines)
