"""Scheduling and failure isolation, with a stand-in executor (no model needed)."""

import pytest

from diffserve.config import OmniDiffusionConfig
from diffserve.engine.engine import DiffusionEngine
from diffserve.engine.cost import CostProfile
from diffserve.engine.executor import Executor
from diffserve.engine.scheduler import Scheduler
from diffserve.models.spec import SamplingSpec
from diffserve.request import DiffusionOutput, OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput

COST = CostProfile(params=1000, self_attention_width=64, cross_attention_width=0, flops_per_s=1e10, ranks=1,
                   device="cpu")
SPEC = SamplingSpec(modality="image", params=frozenset({"height", "width", "num_inference_steps", "guidance_scale"}),
                    defaults={"height": 16, "width": 16, "num_inference_steps": 1, "guidance_scale": 1.0},
                    cfg="guidance", model="EchoPipeline")


def request(prompt, negative=None, **kw):
    sp = OmniDiffusionSamplingParams(**kw)
    return OmniDiffusionRequest(prompts=[PromptInput(prompt=prompt, seed=0, negative_prompt=negative)], sampling_params=sp)


class EchoExecutor(Executor):
    """Returns one 'image' per prompt (the prompt text); fails on prompts containing 'boom'."""

    def __init__(self):
        self.calls = []

    def execute(self, req, progress=None):
        self.calls.append([p.prompt for p in req.prompts])
        for p in req.prompts:
            if "boom" in p.prompt:
                raise RuntimeError("kernel exploded")
            if "bad" in p.prompt:
                raise ValueError("height must be a multiple of 16")
        return DiffusionOutput(images=[p.prompt for p in req.prompts], metrics={"pipeline_s": 0.1})

    def collective_rpc(self, method, *args):
        return [{"sampling_spec": SPEC, "cost_profile": COST,
                 "load_report": {"load_s": 0.0, "peak_host_bytes": 0}}[method]]

    def request_abort(self): ...
    def start_profile(self, trace_dir): ...
    def stop_profile(self): return []
    def is_healthy(self): return True
    def shutdown(self): ...


@pytest.fixture
def engine(tiny_flux):
    cfg = OmniDiffusionConfig(model=tiny_flux, max_batch_size=3)
    return DiffusionEngine(cfg, executor=EchoExecutor())


def test_batches_respect_compatibility_and_size():
    scheduler = Scheduler(SPEC, max_batch_size=3)
    # No size given is the model's default (16): "a" and "c" share a batch.
    reqs = [request("a"), request("b", height=32), request("c", height=16),
            request("d", height=16), request("e", height=16), request("f", height=32, width=32)]
    for req in reqs:
        scheduler.add(scheduler.admit(req))
    batches = []
    while (batch := scheduler.start_batch()) is not None:
        batches.append([r.prompts[0].prompt for r in batch.requests])
    assert batches == [["a", "c", "d"], ["b"], ["e"], ["f"]]


def test_outputs_come_back_in_order_per_request(engine):
    reqs = [request(p) for p in "abcd"]
    outs = engine.generate(reqs)
    assert [o.images for o in outs] == [["a"], ["b"], ["c"], ["d"]]
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    assert engine.executor.calls == [["a", "b", "c"], ["d"]]


def test_failing_request_does_not_fail_its_batch(engine):
    outs = engine.generate([request("a"), request("boom"), request("c")])
    assert outs[0].images == ["a"] and outs[2].images == ["c"]
    assert outs[1].error == "RuntimeError: kernel exploded" and outs[1].error_type == "internal"
    assert outs[1].images is None


def test_invalid_request_is_marked_as_such(engine):
    out = engine.generate([request("bad")])[0]
    assert out.error_type == "invalid_request" and "multiple of 16" in out.error


def test_a_large_request_is_announced_before_it_runs(engine, caplog):
    engine.generate([request("small")])
    assert "is large for this" not in caplog.text
    engine.generate([request("big", height=2048, width=2048)])
    assert "this request (2048x2048, 1 steps) is large for this cpu" in caplog.text
    assert "lower height, width, num_inference_steps to make it faster" in caplog.text


def test_the_work_estimate_grows_with_size_steps_and_cfg(engine):
    def seconds(**kw):
        return engine.estimate_seconds(engine.admit(request("x", **kw)))

    base = seconds(height=64, width=64, guidance_scale=1.0)
    assert seconds(height=128, width=128, guidance_scale=1.0) > 4 * base  # attention is quadratic in tokens
    assert seconds(height=64, width=64, guidance_scale=3.0) == 2 * base  # CFG doubles the forwards
