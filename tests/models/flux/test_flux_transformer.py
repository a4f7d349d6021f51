"""Our FLUX transformer against diffusers' FluxTransformer2DModel on the same safetensors."""

import pytest
import torch
from diffusers import FluxTransformer2DModel as ReferenceTransformer

from diffserve.models.interface import block_list_attrs, hsdp_shard_conditions
from diffserve.loader.diffusers_loader import materialize_meta_tensors
from diffserve.loader.weight_utils import weights_iterator
from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig

# fp32 on CPU. Measured max-abs difference: 0.0 (the same operations in the same order).
TOLERANCE = 1e-5


def load_ours(folder: str) -> FluxTransformer2DModel:
    with torch.device("meta"):
        model = FluxTransformer2DModel(FluxTransformerConfig.from_pretrained(folder))
    materialize_meta_tensors(model, torch.device("cpu"))
    loaded = model.load_weights(weights_iterator(folder))
    assert loaded == {n for n, _ in model.named_parameters()}
    return model.eval()


def random_inputs(guidance: bool, batch=2, img_len=24, txt_len=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, img_len, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=torch.randint(0, 12, (img_len, 3), generator=g).float(),
        txt_ids=torch.zeros(txt_len, 3),
        guidance=torch.full((batch,), 3.5) if guidance else None,
    )


@pytest.mark.parametrize("arch, guidance", [("flux", True), ("flux-schnell", False)])
def test_transformer_matches_diffusers(tiny_checkpoint, arch, guidance):
    folder = f"{tiny_checkpoint(arch)}/transformer"
    reference = ReferenceTransformer.from_pretrained(folder).eval()
    ours = load_ours(folder)
    inputs = random_inputs(guidance)
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        actual = ours(**inputs)
    assert expected.abs().mean() > 0.1  # a real signal, not zeros
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_guidance_mismatch_is_an_error(tiny_checkpoint):
    ours = load_ours(f"{tiny_checkpoint('flux')}/transformer")
    with pytest.raises(ValueError, match="guidance must be given"):
        ours(**random_inputs(guidance=False))


def test_declares_engine_attributes():
    cls = FluxTransformer2DModel
    assert cls._repeated_blocks == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert "proj_out" in cls._sp_plan and "hidden_states" in cls._sp_plan[""]
    with torch.device("meta"):
        model = cls(FluxTransformerConfig(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                          num_attention_heads=2, axes_dims_rope=(4, 6, 6)))
    # Derived from _repeated_blocks: the block lists (caching, offload) and what HSDP shards.
    assert block_list_attrs(model) == ["transformer_blocks", "single_transformer_blocks"]
    sharded = [n for n, m in model.named_modules() if any(c(n, m) for c in hsdp_shard_conditions(model))]
    assert sharded == ["transformer_blocks.0", "single_transformer_blocks.0"]


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="unsupported key.*'use_magic'"):
        FluxTransformerConfig.from_dict({"_class_name": "FluxTransformer2DModel", "use_magic": True})


def test_real_flux_dev_config_has_12b_parameters():
    """The real FLUX.1-dev shape builds (on meta) with the published parameter count, 11.9B."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(FluxTransformerConfig(guidance_embeds=True))
    count = sum(p.numel() for p in model.parameters())
    assert 11.85e9 < count < 11.95e9
