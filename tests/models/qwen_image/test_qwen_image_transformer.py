"""Our Qwen-Image transformer against diffusers' QwenImageTransformer2DModel on the same safetensors."""

import pytest
import torch
from diffusers import QwenImageTransformer2DModel as ReferenceTransformer

from diffserve.distributed.sp_plan import SequenceParallelOutput
from diffserve.loader.diffusers_loader import materialize_meta_tensors
from diffserve.loader.weight_utils import weights_iterator
from diffserve.models.qwen_image.qwen_image_transformer import (
    QwenImageTransformer2DModel,
    QwenImageTransformerBlock,
    QwenImageTransformerConfig,
)
from diffserve.testing.qwen_image import build_tiny_transformer

# fp32 on CPU. Measured max-abs difference (2026-11-30): 4.8e-7 (Qwen-Image), 5.4e-7 (zero_cond_t),
# 1.8e-6 (layered), on outputs of mean magnitude ~0.55: float32 rounding (the RoPE phases are computed
# in float32 and the timestep sinusoid in diffusers' order, as the reference does).
TOLERANCE = 1e-5

TEXT_DIM, LATENT_CHANNELS = 32, 64
# Per variant: the images of one batch row (the one denoised first, then reference images), non-square.
IMAGE_SHAPES = {
    "qwen-image": [(1, 4, 6)],
    "qwen-image-edit-plus": [(1, 4, 6), (1, 6, 4), (1, 2, 2)],  # zero_cond_t: references modulated at t=0
    "layered": [(1, 4, 6), (1, 4, 6), (1, 6, 6)],  # two layers, then the input image at frame -1
}


@pytest.fixture(scope="module")
def transformer_folder(tiny_checkpoint, tmp_path_factory):
    def get(variant: str) -> str:
        if variant != "layered":
            return f"{tiny_checkpoint(variant)}/transformer"
        folder = tmp_path_factory.getbasetemp() / "qwen-image-layered-transformer"
        if not folder.exists():
            build_tiny_transformer(seed=3, layered=True).save_pretrained(folder)
        return str(folder)

    return get


def load_ours(folder: str) -> QwenImageTransformer2DModel:
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(QwenImageTransformerConfig.from_pretrained(folder))
    materialize_meta_tensors(model, torch.device("cpu"))
    loaded = model.load_weights(weights_iterator(folder))
    assert loaded == {n for n, _ in model.named_parameters()}
    return model.eval()


def random_inputs(variant: str, masked: bool = True, batch=2, text_len=40, seed=0):
    """A padded prompt batch: row 0 uses every text token, row 1 only the first 23."""
    g = torch.Generator().manual_seed(seed)
    shapes = IMAGE_SHAPES[variant]
    image_len = sum(f * h * w for f, h, w in shapes)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[1, 23:] = 0
    inputs = dict(
        hidden_states=torch.randn(batch, image_len, LATENT_CHANNELS, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g),
        encoder_hidden_states_mask=mask if masked else None,
        timestep=torch.rand(batch, generator=g),
        img_shapes=[shapes] * batch,
    )
    if variant == "layered":
        inputs["additional_t_cond"] = torch.tensor([0, 1])
    return inputs


@pytest.mark.parametrize("variant", ["qwen-image", "qwen-image-edit-plus", "layered"])
@pytest.mark.parametrize("masked", [True, False], ids=["padded-prompt", "no-mask"])
def test_transformer_matches_diffusers(transformer_folder, variant, masked):
    folder = transformer_folder(variant)
    reference = ReferenceTransformer.from_pretrained(folder).eval()
    ours = load_ours(folder)
    inputs = random_inputs(variant, masked)
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        actual = ours(**inputs)
    assert expected.abs().mean() > 0.1  # a real signal, not zeros
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_variants_are_built_from_the_config(transformer_folder):
    assert QwenImageTransformerConfig.from_pretrained(transformer_folder("qwen-image-edit-plus")).zero_cond_t
    layered = QwenImageTransformerConfig.from_pretrained(transformer_folder("layered"))
    assert layered.use_additional_t_cond and layered.use_layer3d_rope


def test_padded_text_tokens_do_not_reach_the_image(transformer_folder):
    ours = load_ours(transformer_folder("qwen-image"))
    inputs = random_inputs("qwen-image")
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][1, 23:] += 5.0  # only row 1's padding
    with torch.no_grad():
        before, after = ours(**inputs), ours(**changed)
    assert torch.equal(before, after)


def test_invalid_inputs_are_clear_errors(transformer_folder):
    ours = load_ours(transformer_folder("qwen-image"))
    inputs = random_inputs("qwen-image")
    with pytest.raises(ValueError, match="every batch row must have the same image shapes"):
        ours(**dict(inputs, img_shapes=[[(1, 4, 6)], [(1, 6, 4)]]))
    with pytest.raises(ValueError, match="img_shapes must be one list"):
        ours(**dict(inputs, img_shapes=[(1, 4, 6)]))
    with pytest.raises(ValueError, match="additional_t_cond must be given exactly when"):
        ours(**inputs, additional_t_cond=torch.tensor([0, 1]))
    layered = load_ours(transformer_folder("layered"))
    with pytest.raises(ValueError, match="additional_t_cond must be given exactly when"):
        layered(**dict(random_inputs("layered"), additional_t_cond=None))


def tiny_model(**overrides) -> QwenImageTransformer2DModel:
    config = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                  axes_dims_rope=(4, 6, 6), **overrides)
    with torch.device("meta"):
        return QwenImageTransformer2DModel(QwenImageTransformerConfig(**config))


def test_declares_engine_attributes():
    cls = QwenImageTransformer2DModel
    model = tiny_model(zero_cond_t=True)
    assert cls._repeated_blocks == ["QwenImageTransformerBlock"]
    assert cls._layerwise_offload_blocks_attrs == ["transformer_blocks"]
    assert cls._cache_blocks == {"transformer_blocks": "Pattern_1"}
    sharded = [n for n, m in model.named_modules() if any(c(n, m) for c in cls._hsdp_shard_conditions)]
    assert sharded == ["transformer_blocks.0", "transformer_blocks.1"]
    assert all(isinstance(model.get_submodule(n), QwenImageTransformerBlock) for n in sharded)
    for name in cls._sp_plan:
        model.get_submodule(name)  # raises if the plan names a missing submodule
    assert isinstance(cls._sp_plan["proj_out"], SequenceParallelOutput)
    # Both streams are split: the image on entry, the text (padded, masked) at the first block, after
    # its RoPE table was computed from the whole prompt; the text mask on entry, as the text's mask.
    assert set(cls._sp_plan[""]) == {"hidden_states", "encoder_hidden_states_mask"}
    assert cls._sp_plan[""]["encoder_hidden_states_mask"].mask_of == "encoder_hidden_states"
    assert cls._sp_plan["transformer_blocks.0"]["encoder_hidden_states"].pad


def test_teacache_signal_is_the_first_blocks_modulated_image(transformer_folder):
    """The signal the TeaCache backend reads, called with the first block's arguments as the model
    passes them (with zero_cond_t: per-token modulation, reference tokens at timestep 0)."""
    model = load_ours(transformer_folder("qwen-image-edit-plus"))
    calls = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda module, args: calls.append(args))
    with torch.no_grad():
        model(**random_inputs("qwen-image-edit-plus"))
        signal = model._teacache_modulated_input(model.transformer_blocks[0], *calls[0])
    hidden_states = calls[0][0]
    assert signal.shape == hidden_states.shape and not torch.equal(signal, hidden_states)


def test_sp_plan_splits_agree_on_the_token_counts():
    """Every tensor the plan splits has one entry per image token (or, padded, per text token), at the
    dim and rank the plan declares."""
    model = tiny_model(zero_cond_t=True)
    shapes = tuple(IMAGE_SHAPES["qwen-image-edit-plus"])
    image_len, text_len = sum(f * h * w for f, h, w in shapes), 7
    outputs = {
        "pos_embed": model.pos_embed(shapes, text_len, torch.device("cpu")),
        "reference_tokens": (model.reference_tokens(shapes, torch.device("cpu")),),
    }
    for name, tensors in outputs.items():
        for index, spec in QwenImageTransformer2DModel._sp_plan[name].items():
            assert spec.split_output and tensors[index].dim() == spec.expected_dims
            assert tensors[index].shape[spec.split_dim] == (text_len if spec.pad else image_len)
    assert [spec.pad for spec in QwenImageTransformer2DModel._sp_plan["pos_embed"].values()] == [False, False, True, True]


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="unsupported key.*'use_magic'"):
        QwenImageTransformerConfig.from_dict({"_class_name": "QwenImageTransformer2DModel", "use_magic": True})


def test_every_diffusers_config_key_is_accepted(transformer_folder):
    import json

    with open(f"{transformer_folder('layered')}/config.json") as f:
        keys = {k for k in json.load(f) if not k.startswith("_")}
    # diffusers 0.42.1's keys, plus the one its released config still carries.
    assert keys | {"pooled_projection_dim"} == set(QwenImageTransformerConfig.__dataclass_fields__)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(guidance_embeds=True), "guidance_embeds=True is not supported"),
        (dict(axes_dims_rope=(16, 56, 48)), "must be three widths .* summing to attention_head_dim 128"),
    ],
)
def test_unsupported_config_values_are_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        QwenImageTransformerConfig(**overrides)


# transformer/config.json of Qwen/Qwen-Image as released (written by diffusers 0.34.0.dev0, whose class
# still took pooled_projection_dim); Qwen-Image-Edit-2511 adds zero_cond_t, Qwen-Image-Layered the
# additional timestep condition and layer RoPE.
RELEASED_QWEN_IMAGE_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": "0.34.0.dev0",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 768,
}


@pytest.mark.parametrize(
    "variant, expected",
    [
        ({}, 20_430_401_088),
        ({"zero_cond_t": True}, 20_430_401_088),
        ({"use_additional_t_cond": True, "use_layer3d_rope": True}, 20_430_407_232),
    ],
    ids=["qwen-image", "edit-2511", "layered"],
)
def test_released_configs_build_on_meta_with_20b_parameters(variant, expected):
    """The released shape (60 layers, 24 heads x 128, text 3584) builds on meta with diffusers' exact
    parameter count, 20.4B; Qwen-Image-Layered adds its 2 x 3072 condition embedding."""
    config = QwenImageTransformerConfig.from_dict({**RELEASED_QWEN_IMAGE_CONFIG, **variant})
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(config)
    assert sum(p.numel() for p in model.parameters()) == expected
