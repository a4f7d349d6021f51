"""Our Wan transformer against diffusers' WanTransformer3DModel on the same safetensors."""

import pytest
import torch
from diffusers import WanTransformer3DModel as ReferenceTransformer

from diffserve.models.interface import block_list_attrs, hsdp_shard_conditions
from diffserve.loader.diffusers_loader import materialize_meta_tensors
from diffserve.loader.weight_utils import weights_iterator
from diffserve.models.wan.wan_transformer import (
    WanTI2VTransformer3DModel,
    WanTransformer3DModel,
    WanTransformerConfig,
    rope_axes_dims,
)

# fp32 on CPU. Measured max-abs difference: 0.0 for all three variants (T2V, I2V with CLIP image
# tokens, TI2V with per-token timesteps): the same operations in the same order.
TOLERANCE = 1e-5


def load_ours(folder: str) -> WanTransformer3DModel:
    with torch.device("meta"):
        model = WanTransformer3DModel(WanTransformerConfig.from_pretrained(folder))
    materialize_meta_tensors(model, torch.device("cpu"))
    loaded = model.load_weights(weights_iterator(folder))
    assert loaded == {n for n, _ in model.named_parameters()}
    return model.eval()


def random_inputs(in_channels: int, image_dim: int | None, per_token_timesteps: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch, frames, height, width = 2, 3, 8, 12  # 3 x 4 x 6 = 72 patch tokens, non-square
    inputs = dict(
        hidden_states=torch.randn(batch, in_channels, frames, height, width, generator=g),
        timestep=torch.tensor([999.0, 421.5]),
        # diffusers' I2V attention takes the last 512 context tokens as text (hard-coded).
        encoder_hidden_states=torch.randn(batch, 512 if image_dim else 16, 32, generator=g),
    )
    if per_token_timesteps:
        inputs["timestep"] = torch.rand(batch, frames * (height // 2) * (width // 2), generator=g) * 1000
    if image_dim:
        inputs["encoder_hidden_states_image"] = torch.randn(batch, 17, image_dim, generator=g)
    return inputs


@pytest.mark.parametrize(
    "arch, in_channels, image_dim, per_token",
    [("wan2.1-t2v", 16, None, False), ("wan2.1-i2v", 36, 16, False), ("wan2.2-ti2v", 48, None, True)],
)
def test_transformer_matches_diffusers(tiny_checkpoint, arch, in_channels, image_dim, per_token):
    folder = f"{tiny_checkpoint(arch)}/transformer"
    reference = ReferenceTransformer.from_pretrained(folder).eval()
    ours = load_ours(folder)
    inputs = random_inputs(in_channels, image_dim, per_token)
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        actual = ours(**inputs)
    assert actual.shape == expected.shape
    assert expected.abs().mean() > 0.1  # a real signal, not zeros
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_image_tokens_must_match_the_model(tiny_checkpoint):
    t2v = load_ours(f"{tiny_checkpoint('wan2.1-t2v')}/transformer")
    with pytest.raises(ValueError, match="encoder_hidden_states_image must be given exactly"):
        t2v(**random_inputs(16, image_dim=16, per_token_timesteps=False))
    i2v = load_ours(f"{tiny_checkpoint('wan2.1-i2v')}/transformer")
    inputs = random_inputs(36, image_dim=16, per_token_timesteps=False)
    del inputs["encoder_hidden_states_image"]
    with pytest.raises(ValueError, match="image_dim=16"):
        i2v(**inputs)


def test_unused_norm_added_q_in_checkpoint_is_ignored(tiny_checkpoint):
    folder = f"{tiny_checkpoint('wan2.1-i2v')}/transformer"
    ours = load_ours(folder)
    extra = [("blocks.0.attn2.norm_added_q.weight", torch.ones(24))]
    loaded = ours.load_weights(list(weights_iterator(folder)) + extra)
    assert loaded == {n for n, _ in ours.named_parameters()}


def test_declares_engine_attributes():
    cls = WanTransformer3DModel
    assert cls._repeated_blocks == ["WanTransformerBlock"]
    assert set(cls._sp_plan) == {"rope", "blocks.0", "proj_out"}
    assert "timestep" in WanTI2VTransformer3DModel._sp_plan[""]
    with torch.device("meta"):
        model = cls(WanTransformerConfig(num_layers=2, num_attention_heads=2, attention_head_dim=12, text_dim=8,
                                         ffn_dim=16))
    # Derived from _repeated_blocks: the block lists (caching, offload) and what HSDP shards.
    assert block_list_attrs(model) == ["blocks"]
    sharded = [n for n, m in model.named_modules() if any(c(n, m) for c in hsdp_shard_conditions(model))]
    assert sharded == ["blocks.0", "blocks.1"]
    # Every plan entry names a real submodule.
    for path in cls._sp_plan:
        assert path == "" or model.get_submodule(path) is not None
    # Cross-attention keys/values are whole on every sequence-parallel rank.
    assert model.blocks[0].attn2.attn.skip_sequence_parallel and not model.blocks[0].attn1.attn.skip_sequence_parallel


def test_unknown_config_key_and_unsupported_qk_norm_are_errors():
    with pytest.raises(ValueError, match="unsupported key.*'use_magic'"):
        WanTransformerConfig.from_dict({"_class_name": "WanTransformer3DModel", "use_magic": True})
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
        WanTransformerConfig.from_dict({"qk_norm": "layer_norm"})


def test_rope_axes_split_like_wan():
    assert rope_axes_dims(128) == [44, 42, 42]
    assert rope_axes_dims(12) == [4, 4, 4]


@pytest.mark.parametrize("config, billions", [
    (dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), (1.40, 1.45)),  # Wan2.1-T2V-1.3B
    (dict(), (14.2, 14.4)),  # Wan2.1-T2V-14B (the defaults)
])
def test_real_configs_have_the_published_parameter_counts(config, billions):
    with torch.device("meta"):
        model = WanTransformer3DModel(WanTransformerConfig(**config))
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions[0] < count < billions[1]


def test_tp2_real_wan_14b_config_holds_half_the_bytes(monkeypatch):
    """On the real Wan2.1-14B shape (built on meta) a TP=2 rank holds 50.8% of the parameter bytes:
    only the embedders, the modulation tables and the output projection are replicated."""
    import diffserve.distributed.parallel_state as ps
    from diffserve.engine.worker import local_param_bytes

    config = WanTransformerConfig()
    with torch.device("meta"):
        full = local_param_bytes(WanTransformer3DModel(config))
    monkeypatch.setitem(ps._GROUPS, "tp", ps.GroupCoordinator("tp", ranks=[0, 1], rank_in_group=1))
    with torch.device("meta"):
        shard = local_param_bytes(WanTransformer3DModel(config))
    assert 0.50 <= shard / full < 0.51
