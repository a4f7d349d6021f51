"""The pieces ring attention is built from: attention with its log-sum-exp, and the merge of partials."""

import pytest
import torch

from diffserve.distributed.ring_attention import merge_partial
from diffserve.layers.attention.backends import TorchSDPABackend


def _qkv(seed=0, s_q=10, s_kv=12, heads=3, dim=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, s, heads, dim, generator=g) for s in (s_q, s_kv, s_kv))


def test_forward_with_lse_matches_sdpa_and_the_exact_logsumexp():
    q, k, v = _qkv()
    out, lse = TorchSDPABackend.forward_with_lse(q, k, v, 0.25)
    assert out.shape == q.shape and lse.shape == (2, 3, 10) and lse.dtype == torch.float32
    # Measured 0.0 and 4.8e-7 (fp32, CPU flash kernel); tolerance 1e-5.
    assert (out - TorchSDPABackend.forward(q, k, v, None, 0.25, False)).abs().max() <= 1e-5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    assert (lse - scores.logsumexp(-1)).abs().max() <= 1e-5


@pytest.mark.parametrize("splits", [[6, 6], [1, 5, 6], [4, 4, 4]])
def test_merged_partials_equal_attention_over_all_keys(splits):
    """However the keys are split (uneven parts too), merging the partials by LSE is full attention."""
    q, k, v = _qkv(seed=1)
    full, full_lse = TorchSDPABackend.forward_with_lse(q, k, v, 0.25)
    out = lse = None
    for k_part, v_part in zip(k.split(splits, dim=1), v.split(splits, dim=1)):
        part, part_lse = TorchSDPABackend.forward_with_lse(q, k_part, v_part, 0.25)
        out, lse = (part, part_lse) if out is None else merge_partial(out, lse, part, part_lse)
    # Measured <= 4.8e-7; tolerance 1e-5.
    assert (out - full).abs().max() <= 1e-5
    assert (lse - full_lse).abs().max() <= 1e-5
