"""TeaCache's fixed schedule and CFG truncation through the engine, on the tiny demo model (fp32, CPU):
the path `cache_backend="tea_cache", cache_config={...}` takes for any CFGParallelMixin pipeline."""

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.testing import output_tensor

REQUEST = ("a red circle above a blue square",
           OmniDiffusionSamplingParams(num_inference_steps=5, height=32, width=32, guidance_scale=4.0, seed=3,
                                       output_type="pt"))
SCHEDULE = {"reuse": "output", "calibrator": "none", "fixed_schedule": True, "compute_last_step": False}


def _run(path: str, config: dict | None):
    """(output, cached steps, the batch of each transformer call)."""
    kwargs = {"cache_backend": "tea_cache", "cache_config": config} if config is not None else {}
    with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True, **kwargs) as omni:
        batches = []
        transformer = omni.engine.executor.worker.pipeline.transformer
        transformer.transformer_blocks[0].register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
        out = omni.generate(*REQUEST)[0]
    return output_tensor(out), out.metrics.get("cached_steps", 0), batches


@pytest.fixture(scope="module")
def uncached(tiny_checkpoint):
    return _run(tiny_checkpoint("demo-dit"), None)


def test_nothing_skipped_or_truncated_equals_the_uncached_output(tiny_checkpoint, uncached):
    # Every step in the warm-up; truncation from step 5 of 5 never applies.
    config = {**SCHEDULE, "warmup_steps": 5, "cfg_truncation_step": 5}
    output, cached, batches = _run(tiny_checkpoint("demo-dit"), config)
    assert torch.equal(output, uncached[0])
    assert cached == 0 and batches == uncached[2] == [2] * 5


def test_skipped_and_truncated_steps_run_the_schedule(tiny_checkpoint, uncached):
    """Steps 0-1 with CFG, 2 reuses, 3 runs the conditional branch alone, 4 reuses it."""
    config = {**SCHEDULE, "warmup_steps": 2, "cfg_truncation_step": 3}
    output, cached, batches = _run(tiny_checkpoint("demo-dit"), config)
    assert cached == 2 and batches == [2, 2, 1]
    assert not torch.equal(output, uncached[0])
    assert (output - uncached[0]).norm() / uncached[0].norm() < 0.2
