"""Which block lists a step cache wraps: declared by the transformer, or derived from its blocks."""

import pytest
import torch
import torch.nn as nn

from diffserve.cache.blocks import cache_block_lists, infer_forward_pattern


def test_flux_declares_both_block_lists_as_pattern_1():
    from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig

    with torch.device("meta"):
        flux = FluxTransformer2DModel(FluxTransformerConfig(num_layers=1, num_single_layers=1))
    lists = cache_block_lists(flux)
    assert [(lst.attr, lst.pattern) for lst in lists] == [
        ("transformer_blocks", "Pattern_1"),
        ("single_transformer_blocks", "Pattern_1"),
    ]
    assert lists[0].blocks is flux.transformer_blocks


def test_single_list_models_are_inferred_from_the_block_signature():
    from diffserve.models.demo_dit.configs import DemoDiTConfig
    from diffserve.models.demo_dit.demo_dit_transformer import DemoDiTTransformer2DModel
    from diffserve.models.wan.wan_transformer import WanTransformer3DModel, WanTransformerConfig

    with torch.device("meta"):
        wan = WanTransformer3DModel(
            WanTransformerConfig(num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=8, text_dim=8)
        )
        demo = DemoDiTTransformer2DModel(DemoDiTConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32))
    # WanTransformerBlock(hidden_states, encoder_hidden_states, temb, ...) -> Tensor
    assert [(lst.attr, lst.pattern) for lst in cache_block_lists(wan)] == [("blocks", "Pattern_2")]
    # DemoDiTBlock(hidden_states, temb, rotary_emb) -> Tensor
    assert [(lst.attr, lst.pattern) for lst in cache_block_lists(demo)] == [("transformer_blocks", "Pattern_3")]


class TupleBlock(nn.Module):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return encoder_hidden_states, hidden_states


class Unannotated(nn.Module):
    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TupleBlock()])


def test_a_pattern_the_signature_cannot_tell_must_be_declared():
    assert infer_forward_pattern(TupleBlock()) is None
    with pytest.raises(ValueError, match=r"cannot be read from its signature; declare _cache_blocks = \{'blocks'"):
        cache_block_lists(Unannotated())


class TensorBlock(nn.Module):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + encoder_hidden_states


class TwoListsFromRepeatedBlocks(nn.Module):
    """Declares only its block class: the lists (and their order) come from its children."""

    _repeated_blocks = ["TensorBlock"]

    def __init__(self):
        super().__init__()
        self.first = nn.ModuleList([TensorBlock(), TensorBlock()])
        self.norm = nn.LayerNorm(4)
        self.second = nn.ModuleList([TensorBlock()])


def test_block_lists_are_derived_from_repeated_blocks():
    lists = cache_block_lists(TwoListsFromRepeatedBlocks())
    assert [(lst.attr, lst.pattern, len(lst.blocks)) for lst in lists] == [("first", "Pattern_2", 2),
                                                                            ("second", "Pattern_2", 1)]


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="has no block lists a step cache could skip: declare _repeated_blocks"):
        cache_block_lists(nn.Linear(2, 2))


def test_declarations_are_checked():
    model = Unannotated()
    model._cache_blocks = {"blocks": "Pattern_9"}
    with pytest.raises(ValueError, match="'Pattern_9' is not a forward pattern. Allowed: Pattern_0"):
        cache_block_lists(model)
    model._cache_blocks = {"missing": "Pattern_1"}
    with pytest.raises(ValueError, match="Unannotated.missing is not a non-empty nn.ModuleList"):
        cache_block_lists(model)
    model._cache_blocks = {"blocks": "Pattern_1"}
    assert cache_block_lists(model)[0].io.returns == ("encoder_hidden_states", "hidden_states")
