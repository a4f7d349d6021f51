"""Our demo DiT and text encoder (diffserve layers) against the training script's plain-PyTorch
modules on the same safetensors."""

import pytest
import torch

from diffserve.models.interface import block_list_attrs, hsdp_shard_conditions
from diffserve.loader.diffusers_loader import materialize_meta_tensors
from diffserve.loader.weight_utils import weights_iterator
from diffserve.demo import reference
from diffserve.models.demo_dit.configs import DemoDiTConfig, DemoTextEncoderConfig
from diffserve.models.demo_dit.demo_dit_transformer import DemoDiTTransformer2DModel
from diffserve.models.demo_dit.pipeline_demo_dit import image_ids, patchify, unpatchify
from diffserve.models.demo_dit.text_encoder import DemoTextEncoder

# fp32 on CPU. Measured max-abs differences: transformer 4.8e-7, text encoder 9.5e-7.
TOLERANCE = 1e-5


def load_ours(cls, config_cls, folder):
    with torch.device("meta"):
        model = cls(config_cls.from_pretrained(folder))
    materialize_meta_tensors(model, torch.device("cpu"))
    loaded = model.load_weights(weights_iterator(folder))
    assert loaded == {n for n, _ in model.named_parameters()}
    return model.eval()


def test_text_encoder_matches_reference(tiny_demo_dit):
    folder = f"{tiny_demo_dit}/text_encoder"
    pipe = reference.load_pipeline(tiny_demo_dit)
    ours = load_ours(DemoTextEncoder, DemoTextEncoderConfig, folder)
    ids = torch.randint(0, ours.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (h_ref, p_ref), (h, p) = pipe.text_encoder(ids), ours(ids)
    assert h_ref.abs().mean() > 0.1
    assert (h - h_ref).abs().max().item() <= TOLERANCE and (p - p_ref).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("height, width", [(64, 64), (32, 48)])
def test_transformer_matches_reference(tiny_demo_dit, height, width):
    folder = f"{tiny_demo_dit}/transformer"
    ref = reference.load_pipeline(tiny_demo_dit).transformer
    ours = load_ours(DemoDiTTransformer2DModel, DemoDiTConfig, folder)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, height, width, generator=g)
    text = torch.randn(2, 16, ours.config.text_dim, generator=g)
    pooled = torch.randn(2, ours.config.text_dim, generator=g)
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        expected = ref(images, t, text, pooled)
        tokens = ours(
            hidden_states=patchify(images, 4),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=t,
            img_ids=image_ids(height, width, 4, torch.device("cpu")),
            txt_ids=torch.zeros(16, 2),
        )
    actual = unpatchify(tokens, height, width, 4)
    assert expected.abs().mean() > 0.05
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    assert torch.equal(unpatchify(tokens, 8, 12, 4), x)
    assert torch.equal(tokens[0, 1, :16], x[0, 0, :4, 4:8].reshape(-1))  # row-major patches, channel-major inside
    assert image_ids(8, 12, 4, torch.device("cpu")).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_declares_engine_attributes():
    cls = DemoDiTTransformer2DModel
    assert cls._repeated_blocks == ["DemoDiTBlock"]
    assert set(cls._sp_plan[""]) == {"hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"}
    assert "proj_out" in cls._sp_plan
    with torch.device("meta"):
        model = cls(DemoDiTConfig(num_layers=3))
    # Derived from _repeated_blocks: the block lists (caching, offload) and what HSDP shards.
    assert block_list_attrs(model) == ["transformer_blocks"]
    sharded = [n for n, m in model.named_modules() if any(c(n, m) for c in hsdp_shard_conditions(model))]
    assert sharded == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    assert [type(m).__name__ for m in model.transformer_blocks] == ["DemoDiTBlock"] * 3


def test_default_size_fits_the_package_budget():
    """The shipped shapes: 6,519,728 parameters, 13.0 MB as float16 (the package allows 16 MiB)."""
    with torch.device("meta"):
        dit = DemoDiTTransformer2DModel(DemoDiTConfig())
        text = DemoTextEncoder(reference.default_text_encoder_config())
    count = sum(p.numel() for m in (dit, text) for p in m.parameters())
    assert count == 6_519_728
    assert count * 2 < 15.5 * 2**20


def test_reference_and_ours_have_the_same_parameters():
    dit_config = DemoDiTConfig(num_layers=2)
    ref_names = set(reference.ReferenceDiT(dit_config).state_dict())
    with torch.device("meta"):
        ours = DemoDiTTransformer2DModel(dit_config)
    from diffserve.loader.utils import load_weights_with_mapping

    state = reference.ReferenceDiT(dit_config).state_dict()
    materialize_meta_tensors(ours, torch.device("cpu"))
    loaded = load_weights_with_mapping(ours, state.items(), ours.stacked_params_mapping, ours.weight_renames)
    assert loaded == {n for n, _ in ours.named_parameters()} and len(ref_names) == len(state)


@pytest.mark.parametrize("config_cls", [DemoDiTConfig, DemoTextEncoderConfig])
def test_unknown_config_key_is_an_error(config_cls):
    with pytest.raises(ValueError, match="unsupported key.*'use_magic'"):
        config_cls.from_dict({"_class_name": "x", "use_magic": True})


def test_bad_rope_split_is_an_error():
    with pytest.raises(ValueError, match="must sum to attention_head_dim"):
        DemoDiTConfig(rope_axes_dim=(8, 8))
