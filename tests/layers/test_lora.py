"""LoRA on our linear layers: an active adapter equals its merged weight, on every layer kind and as
TP shards; fused layers take per-part adapters; inactive or scale-0 adapters change nothing.
Measured max-abs differences (fp32, CPU) are float rounding, ~1e-6; the tolerance is 1e-5."""

import pytest
import torch
import torch.nn.functional as F

import diffserve.distributed.parallel_state as ps
from diffserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from diffserve.layers.lora import LoRAPart, attach_lora
from diffserve.loader.weight_utils import WeightLoadingError

TOL = 1e-5


def _loaded(layer, weight, bias=None, shards=None):
    """`layer` filled through its own loaders from the full `weight` (by part where `shards` names them)."""
    if shards is None:
        layer.weight.weight_loader(layer.weight, weight)
    else:
        for shard, rows in zip(shards, weight.split(layer.output_sizes)):
            layer.weight.weight_loader(layer.weight, rows, shard)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias)
    return layer


def _part(out_features, in_features, rank, seed, scale=1.0, shard_id=None):
    g = torch.Generator().manual_seed(seed)
    return LoRAPart(torch.randn(rank, in_features, generator=g), torch.randn(out_features, rank, generator=g),
                    scale, shard_id)


def _delta(part: LoRAPart) -> torch.Tensor:
    return part.scale * part.up @ part.down


@pytest.fixture
def fake_tp(monkeypatch):
    """Pretend to be rank `r` of a 2-way TP group (no collectives run)."""

    def as_rank(rank):
        monkeypatch.setitem(ps._GROUPS, "tp", ps.GroupCoordinator("tp", ranks=[0, 1], rank_in_group=rank))

    return as_rank


@pytest.mark.parametrize("kind", ["replicated", "column", "row_packed", "gathered_column"])
def test_active_adapter_equals_the_merged_weight(kind):
    torch.manual_seed(0)
    w, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(2, 3, 8)
    layer = {
        "replicated": lambda: ReplicatedLinear(8, 12),
        "column": lambda: ColumnParallelLinear(8, 12),
        "gathered_column": lambda: ColumnParallelLinear(8, 12, gather_output=True),
        "row_packed": lambda: RowParallelLinear(8, 12, input_partition_sizes=[2, 6]),
    }[kind]()
    _loaded(layer, w, b)
    part = _part(12, 8, rank=3, seed=1, scale=0.5)
    attach_lora(layer, 0, [part], "layer")
    assert torch.equal(layer(x), F.linear(x, w, b))  # resident but not active
    layer.lora.activate([(0, 2.0)])
    assert (layer(x) - F.linear(x, w + 2.0 * _delta(part), b)).abs().max() <= TOL
    assert torch.equal(layer.weight.data, w)  # unmerged: the base weight is untouched


def test_qkv_parts_land_on_their_rows_and_stack_with_another_adapter():
    torch.manual_seed(0)
    w = torch.randn(24, 8)
    layer = _loaded(QKVParallelLinear(8, 4, total_num_heads=2, bias=False), w, shards="qkv")
    q, v = _part(8, 8, 2, seed=1, shard_id="q"), _part(8, 8, 2, seed=2, scale=3.0, shard_id="v")
    other = _part(24, 8, 4, seed=3)  # an adapter of the fused layer as a whole
    attach_lora(layer, 0, [q, v], "qkv")
    attach_lora(layer, 1, [other], "qkv")
    expected = w + torch.cat([_delta(q), torch.zeros(8, 8), _delta(v)]) * 0.5 + _delta(other) * -1.0
    layer.lora.activate([(0, 0.5), (1, -1.0)])
    x = torch.randn(5, 8)
    assert (layer(x) - F.linear(x, expected)).abs().max() <= TOL


def test_parts_that_share_a_down_projection_share_one_block_of_rank():
    """kohya's fused qkv, split per part, keeps its rank on our fused layer (not three times it)."""
    layer = _loaded(QKVParallelLinear(8, 4, total_num_heads=2, bias=False), torch.randn(24, 8), shards="qkv")
    shared = _part(24, 8, 4, seed=1)
    parts = [LoRAPart(shared.down, rows, 1.0, s) for s, rows in zip("qkv", shared.up.split(8))]
    attach_lora(layer, 0, parts, "qkv")
    assert layer.lora.adapters[0].down.shape == (4, 8)
    layer.lora.activate([(0, 1.0)])
    x = torch.randn(3, 8)
    assert (layer(x) - F.linear(x, layer.weight + _delta(shared))).abs().max() <= TOL


def test_merged_column_takes_an_adapter_of_the_fused_tensor():
    w = torch.randn(8, 4)
    layer = _loaded(MergedColumnParallelLinear(4, [2, 6], bias=False), w)
    part = _part(8, 4, 2, seed=1)
    attach_lora(layer, 0, [part], "merged")
    layer.lora.activate([(0, 1.0)])
    x = torch.randn(3, 4)
    assert (layer(x) - F.linear(x, w + _delta(part))).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["column", "qkv", "row_packed"])
def test_tp2_shards_rebuild_the_full_update(fake_tp, kind):
    """Column shards concatenate to, and row shards' partial sums add up to, the full layer with the
    adapter: B is split by output rows, A by input columns (block by block for a packed input)."""
    torch.manual_seed(0)
    w = torch.randn(24 if kind == "qkv" else 12, 8)
    if kind == "qkv":
        parts = [_part(8, 8, 2, seed=i, scale=0.5, shard_id=s) for i, s in enumerate("qkv")]
        delta = torch.cat([_delta(p) for p in parts])
    else:
        parts = [_part(w.shape[0], 8, 3, seed=1, scale=0.5)]
        delta = _delta(parts[0])
    x = torch.randn(2, 8)
    outputs = []
    for rank in (0, 1):
        fake_tp(rank)
        if kind == "column":
            layer = _loaded(ColumnParallelLinear(8, 12, bias=False), w)
        elif kind == "qkv":
            layer = _loaded(QKVParallelLinear(8, 4, total_num_heads=2, bias=False), w, shards="qkv")
        else:
            layer = _loaded(RowParallelLinear(8, 12, bias=False, input_partition_sizes=[2, 6]), w)
        attach_lora(layer, 0, parts, kind)
        layer.lora.activate([(0, 1.0)])
        if kind == "row_packed":  # this rank's input columns; the reduction is the sum below
            local = torch.cat([x[:, rank : rank + 1], x[:, 2 + 3 * rank : 5 + 3 * rank]], dim=1)
            outputs.append(layer.matmul(local, None))
        else:
            outputs.append(layer(x))
    if kind == "row_packed":
        full = outputs[0] + outputs[1]
    elif kind == "qkv":  # each rank holds its heads of q, k and v
        halves = [out.split(4, dim=-1) for out in outputs]
        full = torch.cat([torch.cat([halves[0][i], halves[1][i]], dim=-1) for i in range(3)], dim=-1)
    else:
        full = torch.cat(outputs, dim=-1)
    assert (full - F.linear(x, w + delta)).abs().max() <= TOL


def test_scale_zero_or_no_selection_is_the_base_layer():
    layer = _loaded(ReplicatedLinear(4, 4, bias=False), torch.randn(4, 4))
    attach_lora(layer, 0, [_part(4, 4, 2, seed=1)], "layer")
    x = torch.randn(3, 4)
    base = F.linear(x, layer.weight)
    layer.lora.activate([])
    assert torch.equal(layer(x), base)
    layer.lora.activate([(0, 0.0)])
    assert torch.equal(layer(x), base)  # the update is exactly zero


def test_an_adapter_that_does_not_fit_is_a_clear_error():
    layer = _loaded(ColumnParallelLinear(8, 12), torch.randn(12, 8), torch.randn(12))
    with pytest.raises(WeightLoadingError, match=r"maps 8 -> 10 features, but the layer maps 8 -> 12; the adapter "
                                                 r"was trained for another model"):
        attach_lora(layer, 0, [_part(10, 8, 2, seed=1)], "adapter 'x', transformer.proj")
    with pytest.raises(WeightLoadingError, match="not a .rank, in. / .out, rank. pair"):
        attach_lora(layer, 0, [LoRAPart(torch.zeros(2, 8), torch.zeros(12, 3), 1.0)], "x")


def test_only_linear_layers_take_adapters():
    with pytest.raises(WeightLoadingError, match="is a Conv1d, not a linear layer"):
        attach_lora(torch.nn.Conv1d(4, 4, 1), 0, [_part(4, 4, 2, seed=1)], "transformer.conv")


def test_adapters_take_the_activation_dtype_not_a_quantized_weights():
    """An FP8 layer's weight is float8; its adapters compute in the activations' dtype."""
    layer = _loaded(ReplicatedLinear(16, 16, bias=False), torch.randn(16, 16))
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)  # stands for Fp8LinearMethod's weight
    attach_lora(layer, 0, [_part(16, 16, 2, seed=1)], "layer", dtype=torch.bfloat16)
    assert layer.lora.adapters[0].down.dtype == layer.lora.adapters[0].up.dtype == torch.bfloat16
