"""Which block lists a step cache wraps: declared by the transformer, or inferred for one list."""

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


def test_several_undeclared_lists_are_refused():
    model = Unannotated()
    model.more_blocks = nn.ModuleList([TupleBlock()])
    model._layerwise_offload_blocks_attrs = ["blocks", "more_blocks"]
    with pytest.raises(ValueError, match="inference needs exactly one"):
        cache_block_lists(model)


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
