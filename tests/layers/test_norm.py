"""Norm layers against the torch/diffusers modules they replace, and RMSNorm across TP-split heads."""

import pytest
import torch
from diffusers.models.normalization import FP32LayerNorm as ReferenceFP32LayerNorm

import diffserve.distributed.parallel_state as ps
from diffserve.layers.norm import ColumnParallelRMSNorm, FP32LayerNorm
from diffserve.layers.rope import grid_positions


def test_fp32_layer_norm_matches_diffusers_in_bf16():
    torch.manual_seed(0)
    ref = ReferenceFP32LayerNorm(16, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    ours = FP32LayerNorm(16, eps=1e-6, elementwise_affine=True)
    ours.weight.data, ours.bias.data = ref.weight.data.clone(), ref.bias.data.clone()
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16) * 3
    out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


def test_column_parallel_rms_norm_tp1_is_rms_norm():
    ref = torch.nn.RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    ours = ColumnParallelRMSNorm(12, eps=1e-6)
    ours.weight.weight_loader(ours.weight, ref.weight.data)
    x = torch.randn(3, 7, 12)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


class _TwoRankGroup:
    """A TP group of 2 seen from one rank; all_reduce adds what the other rank would contribute."""

    def __init__(self, rank, other_partial):
        self.world_size, self.rank_in_group, self.other_partial = 2, rank, other_partial

    def all_reduce(self, x):
        return x + self.other_partial


@pytest.mark.parametrize("rank", [0, 1])
def test_column_parallel_rms_norm_tp2_shard_equals_slice_of_full_norm(monkeypatch, rank):
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 8), torch.randn(8)
    full = torch.nn.functional.rms_norm(x, (8,), weight, 1e-6)
    other = x[..., (1 - rank) * 4 : (2 - rank) * 4]
    group = _TwoRankGroup(rank, other.pow(2).sum(-1, keepdim=True))
    monkeypatch.setattr("diffserve.layers.norm.get_tp_group", lambda: group)
    norm = ColumnParallelRMSNorm(8, eps=1e-6)
    norm.weight.weight_loader(norm.weight, weight)
    torch.testing.assert_close(norm.weight.data, weight[rank * 4 : (rank + 1) * 4])
    torch.testing.assert_close(norm(x[..., rank * 4 : (rank + 1) * 4]), full[..., rank * 4 : (rank + 1) * 4])


def test_column_parallel_rms_norm_indivisible_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(ps._GROUPS, "tp", ps.GroupCoordinator("tp", ranks=[0, 1], rank_in_group=0))
    with pytest.raises(ValueError, match=r"dim \(7\) is not divisible by the tensor parallel size \(2\)"):
        ColumnParallelRMSNorm(7)


def test_grid_positions_are_row_major():
    ids = grid_positions(2, 3, 4)
    assert ids.shape == (24, 3)
    assert ids[0].tolist() == [0, 0, 0] and ids[1].tolist() == [0, 0, 1] and ids[4].tolist() == [0, 1, 0]
    assert ids[12].tolist() == [1, 0, 0] and ids[-1].tolist() == [1, 2, 3]
