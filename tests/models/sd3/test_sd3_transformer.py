"""Our SD3 transformer against diffusers' SD3Transformer2DModel on the same safetensors."""

import pytest
import torch
from diffusers import SD3Transformer2DModel as ReferenceTransformer

from diffserve.loader.diffusers_loader import expected_names, materialize_meta_tensors
from diffserve.loader.weight_utils import weights_iterator
from diffserve.models.sd3.sd3_transformer import (
    SD3Transformer2DModel,
    SD3TransformerBlock,
    SD3TransformerConfig,
    sincos_position_table_2d,
)

# fp32 on CPU. Measured max-abs difference: 0.0 for all three variants (SD3.5-large with q/k RMS norm,
# SD3.5-medium with dual attention, SD3-medium without q/k norm), with and without skip_layers: the
# same operations in the same order.
TOLERANCE = 1e-5

# tiny architecture -> (dual-attention blocks, q/k norm), as built by diffserve.testing.sd3
VARIANTS = {"sd3": ((), "rms_norm"), "sd3.5-medium": ((0, 1), "rms_norm"), "sd3-medium": ((), None)}


def load_ours(folder: str) -> SD3Transformer2DModel:
    with torch.device("meta"):
        model = SD3Transformer2DModel(SD3TransformerConfig.from_pretrained(folder))
    materialize_meta_tensors(model, torch.device("cpu"))
    loaded = model.load_weights(weights_iterator(folder))
    # Every parameter, and the position table (a persistent buffer, as in diffusers).
    assert loaded == expected_names(model, "") == {n for n, _ in model.named_parameters()} | {"pos_embed.pos_embed"}
    return model.eval()


def random_inputs(batch=2, height=16, width=20, txt_len=13, seed=0):
    """Non-square latents: 8 x 10 patches, a centre crop of the 24 x 24 position table."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, 48, generator=g),
        pooled_projections=torch.randn(batch, 40, generator=g),
        timestep=torch.tensor([999.0, 312.5])[:batch],
    )


@pytest.mark.parametrize("skip_layers", [None, [1], [0, 2]], ids=["all-blocks", "skip-1", "skip-first-and-last"])
@pytest.mark.parametrize("arch", list(VARIANTS))
def test_transformer_matches_diffusers(tiny_checkpoint, arch, skip_layers):
    folder = f"{tiny_checkpoint(arch)}/transformer"
    reference = ReferenceTransformer.from_pretrained(folder).eval()
    ours = load_ours(folder)
    inputs = random_inputs()
    with torch.no_grad():
        expected = reference(**inputs, skip_layers=skip_layers, return_dict=False)[0]
        actual = ours(**inputs, skip_layers=skip_layers)
    assert actual.shape == expected.shape == inputs["hidden_states"].shape
    assert expected.abs().mean() > 0.1  # a real signal, not zeros
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_skipping_layers_changes_the_prediction(tiny_checkpoint):
    ours = load_ours(f"{tiny_checkpoint('sd3')}/transformer")
    inputs = random_inputs()
    with torch.no_grad():
        full, skipped = ours(**inputs), ours(**inputs, skip_layers=[1])
    assert (full - skipped).abs().max() > 1e-2


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_variant_structure(tiny_checkpoint, arch):
    dual_layers, qk_norm = VARIANTS[arch]
    ours = load_ours(f"{tiny_checkpoint(arch)}/transformer")
    blocks = ours.transformer_blocks
    assert [i for i, b in enumerate(blocks) if b.attn2 is not None] == list(dual_layers)
    assert all((b.attn.norm_q is not None) == (qk_norm is not None) for b in blocks)
    # Only the last block is context pre-only: no text output projection, no text MLP.
    assert [b.context_pre_only for b in blocks] == [False, False, True]
    assert blocks[-1].attn.to_add_out is None and not hasattr(blocks[-1], "ff_context")


def test_position_table_is_the_fixed_sincos_table(tiny_checkpoint):
    """The checkpoint's table (diffusers computes it at init) is our sin-cos table, bit for bit."""
    ours = load_ours(f"{tiny_checkpoint('sd3')}/transformer")
    config = ours.config
    base_size = config.sample_size // config.patch_size
    table = sincos_position_table_2d(config.inner_dim, config.pos_embed_max_size, base_size)
    assert torch.equal(ours.pos_embed.pos_embed[0], table)


def test_latents_larger_than_the_position_table_are_an_error(tiny_checkpoint):
    ours = load_ours(f"{tiny_checkpoint('sd3')}/transformer")
    with pytest.raises(ValueError, match="latent grid 25x10 patches exceeds the position table"):
        ours(**random_inputs(height=50))
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        ours(**random_inputs(width=21))


def test_invalid_skip_layers_are_an_error(tiny_checkpoint):
    ours = load_ours(f"{tiny_checkpoint('sd3')}/transformer")
    with pytest.raises(ValueError, match=r"skip_layers \[3\] are not block indices; the model has 3 blocks"):
        ours(**random_inputs(), skip_layers=[0, 3])
    # A step cache standing in for the block list would make the indices meaningless.
    ours.transformer_blocks = torch.nn.ModuleList([torch.nn.Identity()])
    with pytest.raises(ValueError, match="skip_layers needs the 3 transformer blocks in place"):
        ours(**random_inputs(), skip_layers=[1])


def test_declares_engine_attributes():
    cls = SD3Transformer2DModel
    assert cls._repeated_blocks == ["SD3TransformerBlock"]
    assert cls._layerwise_offload_blocks_attrs == ["transformer_blocks"]
    assert cls._cache_blocks == {"transformer_blocks": "Pattern_1"}
    assert set(cls._sp_plan) == {"", "pos_embed", "proj_out"}
    assert set(cls._sp_plan[""]) == {"encoder_hidden_states"} and cls._sp_plan["pos_embed"][0].split_output
    with torch.device("meta"):
        model = cls(SD3TransformerConfig(num_layers=3, num_attention_heads=2, attention_head_dim=16,
                                         caption_projection_dim=32, dual_attention_layers=(0,), qk_norm="rms_norm"))
    sharded = [n for n, m in model.named_modules() if any(c(n, m) for c in cls._hsdp_shard_conditions)]
    assert sharded == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    assert all(isinstance(b, SD3TransformerBlock) for b in model.transformer_blocks)
    # Every plan entry names a real submodule.
    for path in cls._sp_plan:
        assert path == "" or model.get_submodule(path) is not None


def test_unknown_config_key_and_unsupported_settings_are_errors():
    with pytest.raises(ValueError, match="unsupported key.*'use_magic'"):
        SD3TransformerConfig.from_dict({"_class_name": "SD3Transformer2DModel", "use_magic": True})
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
        SD3TransformerConfig.from_dict({"qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match=r"caption_projection_dim \(1536\) must equal"):
        SD3TransformerConfig.from_dict({"caption_projection_dim": 1536})
    with pytest.raises(ValueError, match=r"dual_attention_layers \[18\] are not block indices"):
        SD3TransformerConfig.from_dict({"dual_attention_layers": [0, 18]})
    with pytest.raises(ValueError, match="pos_embed_max_size must be an int"):
        SD3TransformerConfig.from_dict({"pos_embed_max_size": None})


# The published configs (transformer/config.json of each repository).
SD35_LARGE = dict(sample_size=128, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = dict(sample_size=128, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                   pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
SD3_MEDIUM = dict(sample_size=128, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                  pos_embed_max_size=192)


@pytest.mark.parametrize("config, parameters, table", [
    (SD35_LARGE, 8_056_627_520, 89_653_248),  # SD3.5-large and large-turbo: published 8.1B
    (SD35_MEDIUM, 2_243_171_520, 226_492_416),  # SD3.5-medium: published 2.5B
    (SD3_MEDIUM, 2_028_328_000, 56_623_104),  # SD3-medium: published 2B
], ids=["sd3.5-large", "sd3.5-medium", "sd3-medium"])
def test_real_configs_have_the_published_parameter_counts(config, parameters, table):
    """Built on meta, ours has exactly diffusers' parameters and position table. The published counts
    (8.1B, 2.5B, 2B) include the table, which the original checkpoints store as a weight."""
    with torch.device("meta"):
        ours = SD3Transformer2DModel(SD3TransformerConfig(**config))
        reference = ReferenceTransformer(**config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == parameters
    assert ours.pos_embed.pos_embed.numel() == reference.pos_embed.pos_embed.numel() == table
