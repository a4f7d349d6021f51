"""Offline data parallelism: `Omni(..., data_parallel_size=2, ulysses_degree=2)` runs the batches of
one call on two replicas at once, each its own Ulysses group of 2 gloo processes (4 in all, each
replica its own rendezvous port), and returns what one replica returns. (The server test,
tests/chaos/test_data_parallel.py, checks DP 2 alone gives exactly one replica's pixels.)"""

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams

PROMPTS = [f"a red circle above a blue square, number {i}" for i in range(6)]


def generate(omni):
    params = [OmniDiffusionSamplingParams(num_inference_steps=2, seed=10 + i, height=32, width=32, output_type="pt")
              for i in range(len(PROMPTS))]
    return omni.generate(PROMPTS, params)


@pytest.fixture(scope="module")
def one_replica(tiny_checkpoint):
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", max_batch_size=2,
              disable_progress_bar=True) as omni:
        return generate(omni)


@pytest.fixture(scope="module")
def two_replicas(tiny_checkpoint):
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", max_batch_size=2,
              data_parallel_size=2, ulysses_degree=2, disable_progress_bar=True) as omni:
        yield omni


def test_data_parallel_with_ulysses_matches_one_replica(two_replicas, one_replica):
    pids = [replica.engine.executor.pids for replica in two_replicas.engine.replicas]
    assert len(pids) == 2 and all(len(group) == 2 for group in pids) and len(set(sum(pids, []))) == 4
    outputs = generate(two_replicas)
    # Same batches (the scheduler forms them as one engine would), same seeds; Ulysses reorders the
    # attention's sums: measured max-abs 6.0e-7.
    for ours, reference in zip(outputs, one_replica):
        assert ours.seed == reference.seed
        assert (ours.images - reference.images).abs().max().item() <= 1e-5
    # 6 prompts in batches of 2: three batches, spread over both replicas.
    assert {out.metrics["replica"] for out in outputs} == {0, 1}


def test_invalid_input_is_refused_before_anything_runs(two_replicas):
    with pytest.raises(ValueError, match="height=30"):
        two_replicas.generate(["fine", "bad"], [OmniDiffusionSamplingParams(num_inference_steps=1),
                                                OmniDiffusionSamplingParams(height=30, num_inference_steps=1)])
    assert two_replicas.engine.is_healthy() and two_replicas.engine.replica_summary()["healthy"] == 2
    out = two_replicas.generate("fine", OmniDiffusionSamplingParams(num_inference_steps=1, seed=0, height=32,
                                                                    width=32, output_type="pt"))
    assert out[0].error is None and torch.isfinite(out[0].images).all()
