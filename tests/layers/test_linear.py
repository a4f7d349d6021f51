"""Parallel linear layers: fused loading, and each TP rank taking exactly its slice."""

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
from diffserve.loader.weight_utils import WeightLoadingError


def _materialize(layer):
    for p in layer.parameters():
        p.data = torch.full_like(p, float("nan"))
    return layer


def test_qkv_fused_equals_three_linears():
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(8, 8) for _ in range(3))
    layer = _materialize(QKVParallelLinear(8, 4, total_num_heads=2))
    for shard, ref in zip("qkv", (q, k, v)):
        layer.weight.weight_loader(layer.weight, ref.weight.data, shard)
        layer.bias.weight_loader(layer.bias, ref.bias.data, shard)
    x = torch.randn(3, 5, 8)
    out_q, out_k, out_v = layer.split_qkv(layer(x))
    for out, ref in zip((out_q, out_k, out_v), (q, k, v)):
        torch.testing.assert_close(out, ref(x))


def test_qkv_rejects_unknown_shard_id():
    layer = _materialize(QKVParallelLinear(8, 4, total_num_heads=2))
    with pytest.raises(WeightLoadingError, match="'q', 'k' or 'v'"):
        layer.weight.weight_loader(layer.weight, torch.zeros(8, 8), "x")


def test_replicated_linear_shape_mismatch_is_an_error():
    layer = _materialize(ReplicatedLinear(4, 6))
    with pytest.raises(WeightLoadingError, match=r"shape \(6, 4\).*\(6, 5\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(6, 5))


def test_row_parallel_tp1_is_plain_linear():
    torch.manual_seed(0)
    ref = torch.nn.Linear(12, 4)
    layer = _materialize(RowParallelLinear(12, 4, input_partition_sizes=[4, 8]))
    layer.weight.weight_loader(layer.weight, ref.weight.data)
    layer.bias.weight_loader(layer.bias, ref.bias.data)
    x = torch.randn(2, 12)
    torch.testing.assert_close(layer(x), ref(x))


@pytest.fixture
def fake_tp(monkeypatch):
    """Pretend to be rank `r` of a 2-way TP group, for load-time slicing (no collectives run)."""

    def as_rank(rank):
        monkeypatch.setitem(ps._GROUPS, "tp", ps.GroupCoordinator("tp", ranks=[0, 1], rank_in_group=rank))

    return as_rank


@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_slices_sum_to_the_full_layer(fake_tp, rank):
    """Column shards + row shards of rank 0 and 1 rebuild the full MLP: y = W2 gelu(W1 x)."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(8, 4), torch.randn(4, 8)
    fake_tp(rank)
    col = _materialize(ColumnParallelLinear(4, 8, bias=False))
    row = _materialize(RowParallelLinear(8, 4, bias=False))
    col.weight.weight_loader(col.weight, w1)
    row.weight.weight_loader(row.weight, w2)
    torch.testing.assert_close(col.weight.data, w1[rank * 4 : (rank + 1) * 4])
    torch.testing.assert_close(row.weight.data, w2[:, rank * 4 : (rank + 1) * 4])


@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_qkv_takes_this_ranks_heads(fake_tp, rank):
    fake_tp(rank)
    layer = _materialize(QKVParallelLinear(4, head_size=2, total_num_heads=4, bias=False))
    assert layer.num_heads == 2 and layer.weight.shape == (12, 4)
    full = {s: torch.arange(32.0).reshape(8, 4) + 100 * i for i, s in enumerate("qkv")}
    for s in "qkv":
        layer.weight.weight_loader(layer.weight, full[s], s)
    for i, s in enumerate("qkv"):
        torch.testing.assert_close(layer.weight.data[i * 4 : (i + 1) * 4], full[s][rank * 4 : (rank + 1) * 4])


@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_packed_row_input_splits_each_block(fake_tp, rank):
    """FLUX single block: proj_out's input is cat([attn (4), mlp (8)]), each block sharded on its own."""
    fake_tp(rank)
    layer = _materialize(RowParallelLinear(12, 3, bias=False, input_partition_sizes=[4, 8]))
    full = torch.arange(36.0).reshape(3, 12)
    layer.weight.weight_loader(layer.weight, full)
    expected = torch.cat([full[:, rank * 2 : rank * 2 + 2], full[:, 4 + rank * 4 : 4 + rank * 4 + 4]], dim=1)
    torch.testing.assert_close(layer.weight.data, expected)


def test_tp_indivisible_heads_is_a_clear_error(fake_tp):
    fake_tp(0)
    with pytest.raises(ValueError, match=r"number of heads \(3\) is not divisible by the tensor parallel size \(2\)"):
        QKVParallelLinear(6, 2, total_num_heads=3)


def test_merged_column_loads_prefused_tensor():
    layer = _materialize(MergedColumnParallelLinear(4, [2, 6], bias=False))
    full = torch.randn(8, 4)
    layer.weight.weight_loader(layer.weight, full)
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), F.linear(x, full))


@pytest.mark.gpu
def test_gelu_in_the_matmul_epilogue_matches_the_separate_activation():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(512, 2048).cuda().to(torch.bfloat16)
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_(0, 0.05)
    x = torch.randn(3, 333, 512, device="cuda", dtype=torch.bfloat16)
    expected = torch.nn.functional.gelu(layer(x).float(), approximate="tanh")
    for fn in (layer.forward_gelu_tanh, torch.compile(layer.forward_gelu_tanh, fullgraph=True)):
        fused = fn(x)
        assert fused.shape == (3, 333, 2048) and fused.dtype == torch.bfloat16
        # One bf16 rounding of the activation instead of two; measured 2.7e-3 on FLUX's shape.
        assert ((fused.float() - expected).norm() / expected.norm()).item() < 6e-3


def test_gelu_is_left_unevaluated_off_cuda():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(16, 32)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(2, 5, 16)
    lazy = layer.forward_gelu_tanh(x)  # left for the next layer to evaluate (or to fuse into FP8 quantization)
    torch.testing.assert_close(lazy.evaluate(), torch.nn.functional.gelu(layer(x), approximate="tanh"))
