"""Tiny LoRA adapter files for the tiny checkpoints, made as users make them (PEFT + diffusers'
save_lora_weights; kohya files converted from those), once per session."""

import pytest

from diffserve.testing.lora import (
    FLUX_KOHYA_TARGETS,
    FLUX_TARGETS,
    WAN_TARGETS,
    make_tiny_lora,
    peft_flux_to_kohya,
)


@pytest.fixture(scope="session")
def flux_adapters(tiny_flux, tmp_path_factory):
    """{name: path}: "style" (every linear layer kind, alpha 8 over rank 4: scale 2), "detail" (attention
    and MLPs, rank 2, alpha 8: scale 4), "kohya" (double blocks in kohya's layout, what diffusers reads back),
    "kohya_full" ("style" in kohya's layout, single blocks and embedders too)."""
    folder = tmp_path_factory.mktemp("flux_lora")
    style = make_tiny_lora(tiny_flux, str(folder / "style.safetensors"), FLUX_TARGETS, rank=4, alpha=8, seed=1)
    kohya_source = make_tiny_lora(tiny_flux, str(folder / "kohya_source.safetensors"), FLUX_KOHYA_TARGETS,
                                  rank=4, alpha=2, seed=3)
    return {
        "style": style,
        "detail": make_tiny_lora(tiny_flux, str(folder / "detail.safetensors"), FLUX_TARGETS[:9], rank=2, alpha=8,
                                 seed=2),
        "kohya": peft_flux_to_kohya(kohya_source, str(folder / "kohya.safetensors")),
        "kohya_full": peft_flux_to_kohya(style, str(folder / "kohya_full.safetensors")),
    }


@pytest.fixture(scope="session")
def tiny_wan(tiny_checkpoint) -> str:
    return tiny_checkpoint("wan2.1-t2v")


@pytest.fixture(scope="session")
def wan_adapters(tiny_wan, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_lora")
    return {
        "motion": make_tiny_lora(tiny_wan, str(folder / "motion.safetensors"), WAN_TARGETS, rank=4, alpha=2, seed=1),
        "look": make_tiny_lora(tiny_wan, str(folder / "look.safetensors"), ["to_q", "to_v", "ffn.net.0.proj"],
                               rank=3, seed=2),
    }
