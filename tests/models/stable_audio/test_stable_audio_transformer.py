"""Our Stable Audio DiT against diffusers' StableAudioDiTModel on the same safetensors."""

import pytest
import torch
from diffusers import StableAudioDiTModel as ReferenceTransformer
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from diffserve.cache.blocks import cache_block_lists
from diffserve.distributed.sp_plan import SequenceParallelOutput
from diffserve.loader.diffusers_loader import materialize_meta_tensors
from diffserve.loader.weight_utils import weights_iterator
from diffserve.models.stable_audio import StableAudioDiTConfig, StableAudioDiTModel
from diffserve.models.stable_audio.stable_audio_transformer import StableAudioRoPE
from diffserve.testing.flux import perturb_

# fp32 on CPU. Measured max-abs difference: 0.0 in every case below (the same operations in the same
# order; grouped-query attention through SDPA's enable_gqa equals diffusers' repeated k/v heads).
TOLERANCE = 1e-5


def load_ours(folder: str) -> StableAudioDiTModel:
    with torch.device("meta"):
        model = StableAudioDiTModel(StableAudioDiTConfig.from_pretrained(folder))
    materialize_meta_tensors(model, torch.device("cpu"))
    loaded = model.load_weights(weights_iterator(folder))
    assert loaded == {n for n, _ in model.named_parameters()}
    return model.eval()


def random_inputs(config, batch=2, frames=15, text_len=12, text_kept=(12, 5), per_sample_timestep=False, seed=0):
    """What the pipeline passes: text + seconds tokens with the padded text positions zeroed (when
    text_kept < text_len), one global token, and the timestep as t.unsqueeze(0), shape [1]."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, text_len, config["cross_attention_input_dim"], generator=g)
    kept = torch.arange(text_len)[None, :] < torch.tensor(text_kept)[:, None]
    return dict(
        hidden_states=torch.randn(batch, config["in_channels"], frames, generator=g),
        timestep=torch.rand(batch if per_sample_timestep else 1, generator=g),
        encoder_hidden_states=text * kept[..., None],
        global_hidden_states=torch.randn(batch, 1, config["global_states_input_dim"], generator=g),
    )


def run_reference(reference: ReferenceTransformer, inputs: dict, encoder_attention_mask=None) -> torch.Tensor:
    # The table as StableAudioPipeline builds it: half the head dim, frames + the global token.
    rotary = get_1d_rotary_pos_embed(
        reference.config.attention_head_dim // 2,
        inputs["hidden_states"].shape[2] + 1,
        use_real=True,
        repeat_interleave_real=False,
    )
    return reference(
        **inputs, rotary_embedding=rotary, encoder_attention_mask=encoder_attention_mask, return_dict=False
    )[0]


def assert_matches(reference_folder: str, **input_kwargs) -> None:
    reference = ReferenceTransformer.from_pretrained(reference_folder).eval()
    ours = load_ours(reference_folder)
    inputs = random_inputs(reference.config, **input_kwargs)
    with torch.no_grad():
        expected = run_reference(reference, inputs)
        actual = ours(**inputs)
    assert expected.abs().mean() > 0.1  # a real signal, not zeros
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    "input_kwargs",
    [
        {},  # as the pipeline passes it: padded text zeroed, one timestep for the batch
        {"text_kept": (12, 12), "per_sample_timestep": True},  # unpadded text, a timestep per sample
        {"frames": 40, "batch": 3, "text_kept": (3, 12, 7)},  # more frames than sample_size
    ],
    ids=["pipeline-padding", "unpadded", "long"],
)
def test_transformer_matches_diffusers(tiny_checkpoint, input_kwargs):
    assert_matches(f"{tiny_checkpoint('stable-audio')}/transformer", **input_kwargs)


def test_encoder_attention_mask_matches_diffusers(tiny_checkpoint):
    folder = f"{tiny_checkpoint('stable-audio')}/transformer"
    reference = ReferenceTransformer.from_pretrained(folder).eval()
    ours = load_ours(folder)
    inputs = random_inputs(reference.config, text_kept=(12, 12))
    mask = torch.arange(12)[None, :] < torch.tensor([[4], [9]])
    with torch.no_grad():
        expected = run_reference(reference, inputs, encoder_attention_mask=mask)
        actual = ours(**inputs, encoder_attention_mask=mask.long())  # 0/1 masks are accepted too
        unmasked = ours(**inputs)
    assert (actual - expected).abs().max().item() <= TOLERANCE
    assert (actual - unmasked).abs().max().item() > 1e-3  # the mask did something


def test_rotary_tables_equal_the_pipelines_at_the_published_length():
    """Float32 frequencies, as StableAudioPipeline computes them (float64 ones differ by ~3e-5 here)."""
    cos, sin = StableAudioRoPE(32)(torch.arange(1025))
    ref_cos, ref_sin = get_1d_rotary_pos_embed(32, 1025, use_real=True, repeat_interleave_real=False)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)

def test_multi_head_cross_attention_matches_diffusers(tmp_path):
    """The variant without grouped-query attention (as many key/value heads as query heads)."""
    torch.manual_seed(0)
    reference = ReferenceTransformer(
        sample_size=8, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
        global_states_input_dim=12, cross_attention_input_dim=20,
    )
    perturb_(reference, 0.05, torch.Generator().manual_seed(1))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    assert_matches(str(tmp_path), frames=8, text_len=6, text_kept=(6, 3))


def test_real_config_is_stable_audio_open_1_0():
    """The real transformer config.json, read through our config, builds (on meta) diffusers' model
    with the same parameter count as ours: 1.057B."""
    real = {
        "_class_name": "StableAudioDiTModel",
        "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": 64,
        "cross_attention_dim": 768,
        "cross_attention_input_dim": 768,
        "global_states_input_dim": 1536,
        "in_channels": 64,
        "num_attention_heads": 24,
        "num_key_value_attention_heads": 12,
        "num_layers": 24,
        "out_channels": 64,
        "sample_size": 1024,
        "time_proj_dim": 256,
    }
    config = StableAudioDiTConfig.from_dict(real)
    assert config == StableAudioDiTConfig()  # the defaults are the published model
    with torch.device("meta"):
        ours = StableAudioDiTModel(config)
        reference = ReferenceTransformer(**{k: v for k, v in real.items() if not k.startswith("_")})
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert 1.05e9 < count < 1.07e9
    # The published checkpoint holds 445 tensors; each lands in one of our parameters (q/k/v and k/v fused).
    assert len(reference.state_dict()) == 445


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="unsupported key.*'use_magic'"):
        StableAudioDiTConfig.from_dict({"_class_name": "StableAudioDiTModel", "use_magic": True})


def test_key_value_heads_must_divide_the_heads():
    message = r"num_attention_heads \(6\) must be a multiple of num_key_value_attention_heads \(4\)"
    with pytest.raises(ValueError, match=message):
        StableAudioDiTConfig(num_attention_heads=6, num_key_value_attention_heads=4)


def test_more_than_one_global_token_is_an_error(tiny_checkpoint):
    folder = f"{tiny_checkpoint('stable-audio')}/transformer"
    ours = load_ours(folder)
    inputs = random_inputs(ReferenceTransformer.load_config(folder))
    inputs["global_hidden_states"] = inputs["global_hidden_states"].repeat(1, 2, 1)
    with pytest.raises(ValueError, match=r"global_hidden_states must be \[batch, 1, 64\].*got shape \(2, 2, 64\)"):
        ours(**inputs)


def test_declares_engine_attributes():
    cls = StableAudioDiTModel
    with torch.device("meta"):
        model = cls(StableAudioDiTConfig(num_layers=2, attention_head_dim=16, num_attention_heads=4,
                                         num_key_value_attention_heads=2))
    assert cls._repeated_blocks == [type(model.transformer_blocks[0]).__name__]
    assert cls._layerwise_offload_blocks_attrs == ["transformer_blocks"]
    sharded = [n for n, m in model.named_modules() if any(c(n, m) for c in cls._hsdp_shard_conditions)]
    assert sharded == ["transformer_blocks.0", "transformer_blocks.1"]
    for name, spec in cls._sp_plan.items():
        model.get_submodule(name)  # raises if the plan names a missing module
        assert isinstance(spec, SequenceParallelOutput) == (name == "proj_out")
    # Step caches read the block I/O from the signature: (hidden_states, encoder_hidden_states, ...) -> Tensor.
    (blocks,) = cache_block_lists(model)
    assert (blocks.attr, blocks.pattern) == ("transformer_blocks", "Pattern_2")


def _with_tp(monkeypatch, size: int) -> None:
    """Pretend to be rank 1 of a tensor-parallel group (construction only reads the group's size and rank)."""
    import diffserve.distributed.parallel_state as ps

    monkeypatch.setitem(ps._GROUPS, "tp", ps.GroupCoordinator("tp", ranks=list(range(size)), rank_in_group=1))


def test_tp_that_would_cut_a_key_value_head_is_an_error(monkeypatch):
    _with_tp(monkeypatch, 4)  # 4 query heads split fine, 2 key/value heads do not
    with pytest.raises(ValueError, match="not a whole number of 16-wide heads.*number of key/value heads"):
        with torch.device("meta"):
            StableAudioDiTModel(StableAudioDiTConfig(num_layers=1, attention_head_dim=16, num_attention_heads=4,
                                                     num_key_value_attention_heads=2))


def test_tp2_real_config_holds_about_half_the_bytes(monkeypatch):
    from diffserve.engine.worker import local_param_bytes

    with torch.device("meta"):
        full = local_param_bytes(StableAudioDiTModel(StableAudioDiTConfig()))
    _with_tp(monkeypatch, 2)
    with torch.device("meta"):
        shard = local_param_bytes(StableAudioDiTModel(StableAudioDiTConfig()))
    # Only the small embedders, norms and the 1x1 convs stay replicated.
    assert 0.50 <= shard / full < 0.51
