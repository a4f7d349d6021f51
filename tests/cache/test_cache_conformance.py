"""Step caching on every conformance model, through the engine (fp32, CPU, tiny random weights).

Every (model, backend) pair a case takes (ConformanceCase.cache_backends: both for native models) works,
and the others are a clear error; a new conformance case joins automatically (a model that declares only
its blocks gets both caches: see diffserve.cache.blocks and the TeaCache defaults).
Each pair shows, on the case's parallel scenario (CFG where the model has it; first prompt, the case's
cache_steps, 4 unless it says otherwise):
- a permissive threshold really skips: cached_steps > 0 and fewer block forwards (counted with
  forward pre-hooks) than the uncached run, and the output stays within the case's cache_max_rel_l2
  (0.2 unless it says otherwise) of it;
- threshold 0 gives exactly the uncached output;
- a second, different request (other prompt, seed and step count) equals the same request on a fresh
  engine: no cache state crosses requests.

Measured (2026-11-26), relative L2 distance / cached steps of the 4 / block forwards vs uncached:
cache_dit: flux 0.027 / 3 / 10 of 16, flux-schnell 0.007 / 2 / 13, demo-dit 0.005 / 3 / 5 of 8,
wan2.1-t2v 0.098 / 3 / 5 of 8, wan2.1-i2v 0.118 / 3 / 5, wan2.2-t2v 0.099 / 2 / 6, wan2.2-i2v
0.051 / 2 / 6, wan2.2-ti2v 0.007 / 3 / 5, wan2.2-ti2v-i2v 0.003 / 3 / 5; tea_cache: flux 0.019 / 2 /
8 of 16, flux-schnell 0.011 / 2 / 8. FLUX.1 Kontext (2026-11-30): cache_dit 0.030 / 3 / 10 of 16,
tea_cache 0.025 / 2 / 8 of 16. (Tiny random Wan models react most: max-abs up to 0.65 on a
frame pixel, so the bound is on the relative L2 distance.) stable-audio, 8 steps, bound 0.3 (its SDE
solver re-noises every step; see its case): cache_dit 0.013 / 1 of 8 / 15 of 16, tea_cache 0.254 / 6 /
4 of 16. SD3 (2026-11-30; 3 blocks): cache_dit sd3 0.025 / 3 / 6 of 12, sd3.5-medium 0.021 / 3 / 6,
sd3-medium 0.021 / 3 / 6; tea_cache (uncalibrated: the raw relative L1 distance decides) sd3 0.029 /
2 / 6, sd3.5-medium 0.024 / 2 / 6, sd3-medium 0.027 / 2 / 6. Through the diffusers adapter
(2026-11-30, cache_dit from cache-dit's own block adapters): pixart-sigma 0.001 / 3 / 5 of 8, ltx-video
0.016 / 3 / 5 of 8; tea_cache on them, and cache_dit on audioldm2 (a UNet cache-dit does not know), are
refused.
"""

import dataclasses
import logging

import pytest
import torch

from diffserve import Omni
from diffserve.cache.blocks import cache_block_lists
from diffserve.models.interface import discover_components
from diffserve.registry import read_model_index
from diffserve.testing import CONFORMANCE_CASES, output_tensor

BACKENDS = ("cache_dit", "tea_cache")
# Cache from the second step on, with no cap on consecutive cached steps.
PERMISSIVE = {
    "cache_dit": {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "max_warmup_steps": 1,
        "max_continuous_cached_steps": -1,
        "residual_diff_threshold": 0.9,
    },
    # One warm-up step whatever the model's default (Wan's is 5, more than these requests have).
    "tea_cache": {"rel_l1_thresh": 1000.0, "warmup_steps": 1},
}
NEVER_SKIP = {"cache_dit": {"residual_diff_threshold": 0.0}, "tea_cache": {"rel_l1_thresh": 0.0}}
SUPPORTED = [(c, b) for c in CONFORMANCE_CASES for b in BACKENDS if b in c.cache_backends]
# Pipelines served through the diffusers adapter get cache_dit where cache-dit knows them, never tea_cache.
REFUSED = [(c, b) for c in CONFORMANCE_CASES for b in BACKENDS if b not in c.cache_backends]


def _ids(pairs):
    return [f"{case.arch}-{backend}" for case, backend in pairs]


def _requests(case):
    """Two different requests from the case's CFG scenario: (prompt, params) each."""
    scenario = case.scenario(case.parallel_scenario)

    def prompt(i: int, seed: int) -> dict:
        p = scenario.prompts[i]
        return {**(p if isinstance(p, dict) else {"prompt": p}), "seed": seed}

    first = (prompt(0, scenario.seeds[0]), dataclasses.replace(scenario.params, num_inference_steps=case.cache_steps))
    second = (prompt(-1, scenario.seeds[-1] + 100), dataclasses.replace(scenario.params, num_inference_steps=3))
    return first, second


def _engine(path, backend=None, config=None):
    kwargs = {"cache_backend": backend, "cache_config": config} if backend else {}
    return Omni(path, dtype="float32", device="cpu", disable_progress_bar=True, **kwargs)


def _count_block_calls(omni) -> list[int]:
    """A one-element counter of forward calls of every transformer block (all denoisers)."""
    count = [0]
    pipeline = omni.engine.executor.worker.pipeline
    for transformer in discover_components(pipeline)["dit"].values():
        for blocks in cache_block_lists(transformer):
            for block in blocks.blocks:
                block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def _run(omni, request):
    out = omni.generate(*request)[0]
    return output_tensor(out), out.metrics


@pytest.fixture(scope="module")
def uncached(tiny_checkpoint):
    """Per architecture: the first request's output and block forward count without a cache."""
    results = {}

    def get(case):
        if case.arch not in results:
            with _engine(tiny_checkpoint(case.arch)) as omni:
                calls = _count_block_calls(omni)
                output, _ = _run(omni, _requests(case)[0])
                results[case.arch] = (output, calls[0])
        return results[case.arch]

    return get


@pytest.fixture(scope="module")
def permissive(tiny_checkpoint):
    """Per (architecture, backend): one engine with the permissive settings runs the first request,
    then the second. Returns the log text, block forward count and (output, metrics) of each."""
    results = {}

    def get(case, backend):
        if (case.arch, backend) not in results:
            handler = _LogCapture()
            cache_logger = logging.getLogger("diffserve.cache")
            cache_logger.addHandler(handler)
            level = cache_logger.level
            cache_logger.setLevel(logging.INFO)
            try:
                with _engine(tiny_checkpoint(case.arch), backend, PERMISSIVE[backend]) as omni:
                    calls = _count_block_calls(omni)
                    first = _run(omni, _requests(case)[0])
                    first_calls = calls[0]
                    second = _run(omni, _requests(case)[1])
            finally:
                cache_logger.removeHandler(handler)
                cache_logger.setLevel(level)
            results[(case.arch, backend)] = ("\n".join(handler.messages), first_calls, first, second)
        return results[(case.arch, backend)]

    return get


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("case, backend", SUPPORTED, ids=_ids(SUPPORTED))
def test_permissive_threshold_skips_blocks_and_stays_close(tiny_checkpoint, uncached, permissive, case, backend):
    expected, uncached_calls = uncached(case)
    log, calls, (output, metrics), _ = permissive(case, backend)
    if backend == "cache_dit":
        pipeline_class = read_model_index(tiny_checkpoint(case.arch))["_class_name"]
        assert f"Cache-dit enabled successfully on {pipeline_class}" in log
    assert metrics["cache_backend"] == backend
    assert metrics["cached_steps"] > 0
    assert calls < uncached_calls
    assert output.shape == expected.shape
    # ||cached - uncached|| / ||uncached|| over the output images or video frames in [0, 1], or waveforms.
    rel_l2 = ((output - expected).norm() / expected.norm()).item()
    assert 0 < rel_l2 <= case.cache_max_rel_l2, rel_l2


@pytest.mark.parametrize("case, backend", SUPPORTED, ids=_ids(SUPPORTED))
def test_threshold_zero_equals_uncached_output(tiny_checkpoint, uncached, case, backend):
    expected, uncached_calls = uncached(case)
    with _engine(tiny_checkpoint(case.arch), backend, NEVER_SKIP[backend]) as omni:
        calls = _count_block_calls(omni)
        output, metrics = _run(omni, _requests(case)[0])
    assert metrics["cached_steps"] == 0
    assert calls[0] == uncached_calls
    assert torch.equal(output, expected)


@pytest.mark.parametrize("case, backend", SUPPORTED, ids=_ids(SUPPORTED))
def test_cache_state_does_not_leak_between_requests(tiny_checkpoint, permissive, case, backend):
    """The engine that ran the first request gives the second what a fresh engine gives it."""
    _, _, _, (after_first, metrics) = permissive(case, backend)
    with _engine(tiny_checkpoint(case.arch), backend, PERMISSIVE[backend]) as fresh:
        alone, fresh_metrics = _run(fresh, _requests(case)[1])
    assert torch.equal(after_first, alone)
    assert metrics["cached_steps"] == fresh_metrics["cached_steps"]


def test_user_coefficients_override_the_declared_ones(tiny_checkpoint):
    """cache_config["coefficients"] replaces the transformer's fitted polynomial."""
    from diffserve import Omni, OmniDiffusionSamplingParams

    sp = OmniDiffusionSamplingParams(num_inference_steps=6, seed=0, output_type="pt")
    # One warm-up step and no cap on consecutive skips (the demo model's defaults have 6 and 3).
    config = {"rel_l1_thresh": 1000.0, "coefficients": [1.0, 0.0], "warmup_steps": 1, "max_continuous_cached_steps": -1}
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", cache_backend="tea_cache",
              cache_config=config) as omni:
        out = omni.generate("a red circle above a blue square", sp)[0]
    assert out.metrics["cached_steps"] == 4  # every step but the first and the last


@pytest.mark.parametrize("case, backend", REFUSED, ids=_ids(REFUSED))
def test_a_cache_the_model_cannot_take_is_a_clear_error(tiny_checkpoint, case, backend):
    class_name = read_model_index(tiny_checkpoint(case.arch))["_class_name"]
    with pytest.raises(ValueError, match=rf"cache_backend='{backend}'.*{class_name}"):
        _engine(tiny_checkpoint(case.arch), backend, PERMISSIVE[backend])
