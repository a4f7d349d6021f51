"""Offload under TP, sequence and CFG parallelism (2 gloo processes, CPU, fp32): each rank offloads and
streams the weights it holds (its TP shard), and the output equals the single-process one without
offload up to the parallel modes' own rounding. Measured max-abs on tiny FLUX (2026-11-30): TP2 +
layerwise 8.9e-7, Ulysses2 + model-level 9.5e-7, CFG2 + layerwise (prefetch 2) 1.0e-6; tolerance
1e-4, as in tests/distributed/test_parallel.py.
"""

import pytest

from diffserve.testing import CONFORMANCE_CASES
from tests.distributed.test_parallel import TOLERANCE, _generate

MODES = {
    "tp2-layerwise": {"tensor_parallel_size": 2, "enable_layerwise_offload": True},
    "ulysses2-cpu_offload": {"ulysses_degree": 2, "enable_cpu_offload": True},
    "cfg2-layerwise-prefetch2": {"cfg_parallel_size": 2, "enable_layerwise_offload": True, "layerwise_prefetch": 2},
}
CASE = CONFORMANCE_CASES[0]  # FLUX.1-dev, its CFG scenario


@pytest.fixture(scope="module")
def single_process(tiny_flux):
    return _generate(tiny_flux, CASE.scenario(CASE.parallel_scenario))


@pytest.mark.parametrize("mode", MODES)
def test_offload_with_parallelism_matches_single_process(tiny_flux, single_process, mode):
    expected, (full_bytes,) = single_process
    actual, per_rank_bytes = _generate(tiny_flux, CASE.scenario(CASE.parallel_scenario), **MODES[mode])
    assert (actual - expected).abs().max().item() <= TOLERANCE
    if mode.startswith("tp2"):
        for rank_bytes in per_rank_bytes:  # each rank holds (and streams) its shard, not the whole model
            assert all(nbytes < 0.8 * full_bytes[name] for name, nbytes in rank_bytes.items())
