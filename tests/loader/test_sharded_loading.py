"""Loading into HSDP shards: a weight_loader written for a whole parameter fills only this rank's rows,
and reads only those rows of the checkpoint tensor.

The windows are built by hand here (row_shard computes them from a DTensor's mesh coordinate); the
2-process HSDP runs in tests/distributed/test_parallel.py (hsdp2) check the whole path: identical
outputs, and each rank holding half of the denoiser's bytes.
"""

import pytest
import torch

from diffserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear
from diffserve.loader.sharded import ShardWindow
from diffserve.loader.weight_utils import WeightLoadingError, default_weight_loader


def _poisoned(full: torch.Tensor, keep: slice) -> torch.Tensor:
    """`full` with NaN outside the rows `keep`: a rank that read them would hold a NaN."""
    poisoned = torch.full_like(full, float("nan"))
    poisoned[keep] = full[keep]
    return poisoned


@pytest.mark.parametrize("start, count", [(0, 3), (3, 3), (6, 1), (7, 0)])
def test_default_loader_fills_only_the_rows_of_the_shard(start, count):
    full = torch.randn(7, 4)
    local = torch.zeros(count, 4)
    window = ShardWindow(local, full.shape, start)
    default_weight_loader(window, _poisoned(full, slice(start, start + count)))
    assert torch.equal(local, full[start : start + count])


def test_a_fused_qkv_loader_fills_its_part_of_each_shard():
    torch.manual_seed(0)
    layer = QKVParallelLinear(hidden_size=4, head_size=2, total_num_heads=3, bias=True)  # 18 fused rows
    q, k, v = (torch.randn(6, 4) for _ in range(3))
    fused = torch.cat([q, k, v])
    # Two ranks, torch.chunk's split: rows 0..8 and 9..17; rank 1 starts in the middle of k.
    for start, count in ((0, 9), (9, 9)):
        local = torch.zeros(count, 4)
        window = ShardWindow(local, layer.weight.shape, start)
        keep = slice(start, start + count)
        for name, part, offset in (("q", q, 0), ("k", k, 6), ("v", v, 12)):
            rows = slice(max(keep.start - offset, 0), max(min(keep.stop - offset, 6), 0))
            layer.weight_loader(window, _poisoned(part, rows), name)
        assert torch.equal(local, fused[keep])


def test_an_already_fused_checkpoint_tensor_is_split_the_same_way():
    layer = MergedColumnParallelLinear(4, [6, 6, 6], bias=False)
    fused = torch.randn(18, 4)
    local = torch.zeros(9, 4)
    layer.weight_loader(ShardWindow(local, layer.weight.shape, 9), _poisoned(fused, slice(9, 18)))
    assert torch.equal(local, fused[9:])


def test_shape_mismatches_and_unsupported_operations_are_errors():
    layer = ReplicatedLinear(4, 6)
    window = ShardWindow(torch.zeros(3, 4), torch.Size([6, 4]), 3)
    with pytest.raises(WeightLoadingError, match=r"has shape \(6, 4\) but the checkpoint tensor has shape \(5, 4\)"):
        layer.weight_loader(window, torch.randn(5, 4))
    with pytest.raises(WeightLoadingError, match="narrowing rows \\(dim 0\\) only"):
        window.narrow(1, 0, 2)
    with pytest.raises(WeightLoadingError, match="used `.t` on a row-sharded"):
        window.t()


def test_an_ordinary_parameter_is_its_own_target():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    assert ShardWindow.of(param) is param
