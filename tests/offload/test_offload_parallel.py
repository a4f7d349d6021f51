"""Offload under tensor parallelism (2 gloo processes, CPU, fp32): each rank streams the blocks of its
own shard, and the output equals the single-process one without offload up to TP's own rounding.
Measured max-abs on tiny FLUX (2026-11-30): TP2 + layerwise 8.9e-7 (Ulysses2 + model-level 9.5e-7 and
CFG2 + layerwise with prefetch 2 1.0e-6, measured by hand); tolerance 1e-4, as in
tests/distributed/test_parallel.py.
"""

from diffserve.testing import CONFORMANCE_CASES
from tests.distributed.test_parallel import TOLERANCE, _generate

CASE = CONFORMANCE_CASES[0]  # FLUX.1-dev, its CFG scenario


def test_layerwise_offload_under_tp_matches_single_process(tiny_flux):
    scenario = CASE.scenario(CASE.parallel_scenario)
    expected, (full_bytes,) = _generate(tiny_flux, scenario)
    actual, per_rank_bytes = _generate(tiny_flux, scenario, tensor_parallel_size=2, enable_layerwise_offload=True)
    assert (actual - expected).abs().max().item() <= TOLERANCE
    for rank_bytes in per_rank_bytes:  # each rank holds (and streams) its shard, not the whole model
        assert all(nbytes < 0.8 * full_bytes[name] for name, nbytes in rank_bytes.items())
