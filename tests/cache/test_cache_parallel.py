"""Across ranks a step cache takes the decisions of the single-process run: same cached steps, same
output (2 gloo processes, CPU). With CFG parallel each rank runs one branch while the single process
batches both; with TP and HSDP the ranks share collectives inside the blocks, so they must agree.

Measured on tiny FLUX, true CFG, 2 prompts, 4 steps (2026-11-26), max-abs difference to one process:
cache_dit (3 cached steps everywhere): cfg2 1.0e-6, tp2 1.0e-6, hsdp2 0.0; tea_cache (2 cached steps
everywhere): cfg2 1.2e-6, tp2 8.3e-7, hsdp2 0.0. Each 2-process run costs seconds, so CI runs CFG
parallel for both backends and HSDP for TeaCache (whose decision reads the first block's weights
outside its forward, where HSDP keeps them sharded); the other pairs were run once, by hand.
"""

import dataclasses

import pytest
import torch

from diffserve import Omni
from diffserve.testing import CONFORMANCE_CASES

PERMISSIVE = {
    "cache_dit": {"max_warmup_steps": 1, "max_continuous_cached_steps": -1, "residual_diff_threshold": 0.9},
    "tea_cache": {"rel_l1_thresh": 1000.0, "warmup_steps": 1},
}


def _generate(path, backend, **parallel):
    case = next(c for c in CONFORMANCE_CASES if c.arch == "flux")
    scenario = case.scenario(case.parallel_scenario)  # true CFG with negative prompts
    prompts = [{**p, "seed": s} for p, s in zip(scenario.prompts, scenario.seeds)]
    params = dataclasses.replace(scenario.params, num_inference_steps=4)
    with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True, cache_backend=backend,
              cache_config=PERMISSIVE[backend], max_batch_size=len(prompts), **parallel) as omni:
        outputs = omni.generate(prompts, params)
    return torch.cat([out.images for out in outputs]), outputs[0].metrics["cached_steps"]


MODES = {
    "cfg2": {"cfg_parallel_size": 2},
    "tp2": {"tensor_parallel_size": 2},
    "hsdp2": {"use_hsdp": True, "hsdp_shard_size": 2},
}


@pytest.fixture(scope="module")
def single_process(tiny_flux):
    results = {}

    def get(backend):
        if backend not in results:
            results[backend] = _generate(tiny_flux, backend)
        return results[backend]

    return get


PAIRS = [("cache_dit", "cfg2"), ("tea_cache", "cfg2"), ("tea_cache", "hsdp2")]


@pytest.mark.parametrize("backend, mode", PAIRS, ids=[f"{b}-{m}" for b, m in PAIRS])
def test_parallel_ranks_take_the_single_process_decisions(tiny_flux, single_process, backend, mode):
    expected, expected_cached = single_process(backend)
    actual, cached = _generate(tiny_flux, backend, **MODES[mode])
    assert expected_cached > 0
    assert cached == expected_cached
    assert (actual - expected).abs().max().item() <= 1e-4
