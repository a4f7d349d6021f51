"""TeaCache's decision rule, per-row (per CFG branch) state and residual replay, on a toy transformer
whose modulated input is chosen by the test."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffserve.cache import TeaCacheConfig
from diffserve.cache.teacache import TeaCacheBackend, relative_l1_distance, rescale
from diffserve.distributed.cfg_parallel import CFGParallelMixin


class ToyBlock(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 0.3)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(hidden_states @ self.weight) * temb[:, None, None]


class UndeclaredTransformer(nn.Module):
    """Declares only its blocks: TeaCache's signal and rescale take their defaults."""

    _repeated_blocks = ["ToyBlock"]

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(i) for i in range(3))

    def forward(self, hidden_states, temb):
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states * 2


class ToyTransformer(UndeclaredTransformer):
    _cache_blocks = {"blocks": "Pattern_3"}
    # Identity rescale: the accumulated value is the raw relative L1 distance.
    _teacache_coefficients = (1.0, 0.0)

    @staticmethod
    def _teacache_modulated_input(block, hidden_states, temb):
        return hidden_states


class ToyPipeline(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = ToyTransformer()


def _with_tea_cache(pipeline, threshold, steps, **config):
    backend = TeaCacheBackend(TeaCacheConfig(rel_l1_thresh=threshold, **config))
    backend.enable(pipeline)
    backend.refresh(pipeline, steps)
    return backend


def _block_calls(transformer) -> list[int]:
    count = [0]
    for block in transformer.blocks:
        block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def _inputs(base: torch.Tensor, steps: int, rate: float):
    """Step t's input is base * (1 + rate * t): its relative L1 change is rate / (1 + rate * (t - 1))."""
    return [base * (1 + rate * t) for t in range(steps)]


def test_skips_follow_the_accumulated_distance_and_replay_the_residual():
    pipeline = ToyPipeline()
    x0, temb = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0)), torch.ones(1)
    inputs = _inputs(x0, 6, 0.1)
    with torch.no_grad():
        uncached = [pipeline.transformer(x, temb) for x in inputs]
        backend = _with_tea_cache(pipeline, 0.25, steps=6)
        calls = _block_calls(pipeline.transformer)
        outputs = [pipeline.transformer(x, temb) for x in inputs]
    # Distances 0.1, 0.091, 0.083, 0.077: steps 1 and 2 accumulate 0.19 < 0.25 (skipped), step 3
    # reaches 0.27 (runs, resets), step 4 is 0.077 (skipped); steps 0 and 5 always run.
    assert backend.cached_steps() == 3
    assert backend.counter.cached_steps == [1, 2, 4]
    assert calls[0] == 3 * 3
    for t in (0, 3, 5):
        torch.testing.assert_close(outputs[t], uncached[t], atol=0, rtol=0)
    # A skipped step adds the blocks' residual from the last computed step to its own input.
    for t, computed in ((1, 0), (2, 0), (4, 3)):
        residual = uncached[computed] / 2 - inputs[computed]
        torch.testing.assert_close(outputs[t], (inputs[t] + residual) * 2)


def test_each_row_keeps_its_own_state_and_any_due_row_runs_the_step():
    """Rows are CFG branches (or prompts) of one batch. A row with a tiny magnitude that changes fast
    is due although the batch-wide distance (dominated by the large, slow row) is small."""
    pipeline = ToyPipeline()
    big, small = torch.full((1, 5, 4), 100.0), torch.full((1, 5, 4), 0.01)
    slow, fast = _inputs(big, 4, 0.01), _inputs(small, 4, 0.5)
    temb = torch.ones(2)
    with torch.no_grad():
        batched = _with_tea_cache(pipeline, 0.1, steps=4)
        for s, f in zip(slow, fast):
            pipeline.transformer(torch.cat([s, f]), temb)
        batch_wide = relative_l1_distance(torch.cat([slow[0], fast[0]])[None], torch.cat([slow[1], fast[1]])[None])
        assert batch_wide.item() < 0.1  # one accumulator for the whole batch would have skipped
        assert batched.cached_steps() == 0
        batched.disable(pipeline)
        alone = _with_tea_cache(pipeline, 0.1, steps=4)
        for s in slow:
            pipeline.transformer(s, temb[:1])
        assert alone.counter.cached_steps == [1, 2]


def test_threshold_zero_never_skips_and_matches_uncached_exactly():
    pipeline = ToyPipeline()
    inputs = _inputs(torch.randn(2, 5, 4), 5, 0.001)
    temb = torch.ones(2)
    with torch.no_grad():
        uncached = [pipeline.transformer(x, temb) for x in inputs]
        backend = _with_tea_cache(pipeline, 0.0, steps=5)
        outputs = [pipeline.transformer(x, temb) for x in inputs]
    assert backend.cached_steps() == 0
    assert all(torch.equal(a, b) for a, b in zip(outputs, uncached))


def test_refresh_starts_a_new_request_and_a_call_past_the_last_step_fails():
    pipeline = ToyPipeline()
    x, temb = torch.randn(1, 5, 4), torch.ones(1)
    with torch.no_grad():
        backend = _with_tea_cache(pipeline, 1e9, steps=3)
        for _ in range(3):
            pipeline.transformer(x, temb)
        assert backend.counter.cached_steps == [1]
        with pytest.raises(RuntimeError, match="call 4 in a request of 3 denoise steps: it needs one call per step"):
            pipeline.transformer(x, temb)
        backend.refresh(pipeline, 3)
        assert backend.cached_steps() == 0 and all(h.previous_input is None for h in backend.hooks)
        pipeline.transformer(x, temb)


def test_step_count_comes_from_the_scheduler_when_the_request_leaves_it_to_the_model():
    pipeline = ToyPipeline()
    pipeline.scheduler = type("Scheduler", (), {"timesteps": torch.arange(4)})()
    x, temb = torch.randn(1, 5, 4), torch.ones(1)
    with torch.no_grad():
        backend = _with_tea_cache(pipeline, 1e9, steps=None)
        for _ in range(4):
            pipeline.transformer(x, temb)
    assert backend.counter.cached_steps == [1, 2]  # the last of the scheduler's 4 steps runs


def test_disable_restores_the_transformer():
    pipeline = ToyPipeline()
    backend = _with_tea_cache(pipeline, 0.1, steps=2)
    assert "forward" in pipeline.transformer.__dict__
    backend.disable(pipeline)
    assert "forward" not in pipeline.transformer.__dict__
    assert isinstance(pipeline.transformer.blocks[0], ToyBlock)


def test_unreplayable_blocks_are_refused():
    pipeline = ToyPipeline()
    pipeline.transformer._cache_blocks = {"blocks": "Pattern_4"}
    with pytest.raises(ValueError, match="cannot skip transformer.blocks: its blocks are Pattern_4"):
        TeaCacheBackend(TeaCacheConfig()).enable(pipeline)
    assert "forward" not in pipeline.transformer.__dict__  # left untouched


def test_an_undeclared_model_gets_the_uncalibrated_defaults(caplog):
    """Default signal: the first block's input; default rescale: none. So it decides exactly as the
    toy transformer that declares those two by hand."""
    declared, undeclared = ToyPipeline(), ToyPipeline()
    undeclared.transformer = UndeclaredTransformer()
    undeclared.transformer.load_state_dict(declared.transformer.state_dict())
    x, temb = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 0.9])
    results = []
    for pipeline in (declared, undeclared):
        backend = _with_tea_cache(pipeline, threshold=0.3, steps=4)
        outputs = [pipeline.transformer(x * (1 + 0.05 * i), temb * (1 - 0.1 * i)) for i in range(4)]
        results.append((backend.counter.cached_steps, torch.stack(outputs)))
    assert "is uncalibrated" in caplog.text
    assert results[0][0] == results[1][0] and results[0][0]  # same steps skipped, and some were
    assert torch.equal(results[0][1], results[1][1])


def test_rescale_is_the_published_polynomial():
    from diffserve.models.flux.flux_transformer import FluxTransformer2DModel

    coefficients = FluxTransformer2DModel._teacache_coefficients
    x = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.6])
    np.testing.assert_allclose(rescale(x, coefficients).numpy(), np.poly1d(coefficients)(x.numpy()), rtol=1e-5)


def test_warmup_steps_always_run():
    pipeline = ToyPipeline()
    x, temb = torch.randn(1, 5, 4), torch.ones(1)
    with torch.no_grad():
        backend = _with_tea_cache(pipeline, 1e9, steps=6, warmup_steps=3)
        for _ in range(6):
            pipeline.transformer(x, temb)
    assert backend.counter.cached_steps == [3, 4]  # steps 0-2 warm up, step 5 is the last


def test_taylorseer_extrapolates_the_residual_of_the_computed_steps():
    """With calibrator="taylorseer" (order 1) a skipped step adds the last computed residual plus its
    per-step change since the computed step before, times the steps elapsed; without it, the last
    residual as it is. Both skip the same steps."""
    pipeline = ToyPipeline()
    x0, temb = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0)), torch.ones(1)
    inputs = _inputs(x0, 6, 0.1)
    with torch.no_grad():
        uncached = [pipeline.transformer(x, temb) for x in inputs]
        outputs = {}
        for calibrator in ("none", "taylorseer"):
            backend = _with_tea_cache(pipeline, 0.25, steps=6, warmup_steps=2, calibrator=calibrator,
                                      taylorseer_order=1)
            outputs[calibrator] = [pipeline.transformer(x, temb) for x in inputs]
            # Warm-up runs steps 0 and 1; then distances 0.091, 0.083, 0.077 accumulate: steps 2 and 3
            # skipped (0.17), step 4 reaches 0.25 and runs, step 5 is the last.
            assert backend.counter.cached_steps == [2, 3]
            backend.disable(pipeline)
    residual = [u / 2 - x for u, x in zip(uncached, inputs)]  # what the blocks add, per computed step
    slope = residual[1] - residual[0]
    for t in (2, 3):
        torch.testing.assert_close(outputs["none"][t], (inputs[t] + residual[1]) * 2)
        torch.testing.assert_close(outputs["taylorseer"][t], (inputs[t] + residual[1] + slope * (t - 1)) * 2)
        assert not torch.allclose(outputs["none"][t], outputs["taylorseer"][t])
    for t in (0, 1, 4, 5):
        torch.testing.assert_close(outputs["taylorseer"][t], uncached[t], atol=0, rtol=0)


def test_max_continuous_cached_steps_caps_a_run_of_skips():
    pipeline = ToyPipeline()
    x, temb = torch.randn(1, 5, 4), torch.ones(1)
    with torch.no_grad():
        backend = _with_tea_cache(pipeline, 1e9, steps=7, max_continuous_cached_steps=2)
        for _ in range(7):
            pipeline.transformer(x, temb)
    assert backend.counter.cached_steps == [1, 2, 4, 5]  # step 3 runs after two skips; 6 is the last


def test_reuse_output_returns_the_last_computed_output_without_running_the_transformer():
    """reuse="output": a skipped step returns the transformer's output of the last computed step
    (order 0) or its Taylor forecast (TaylorSeer), and runs no block; computed steps are unchanged."""
    pipeline = ToyPipeline()
    x0, temb = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0)), torch.ones(1)
    inputs = _inputs(x0, 6, 0.1)
    with torch.no_grad():
        uncached = [pipeline.transformer(x, temb) for x in inputs]
        outputs = {}
        for calibrator in ("none", "taylorseer"):
            backend = _with_tea_cache(pipeline, 0.25, steps=6, warmup_steps=2, calibrator=calibrator, reuse="output")
            calls = _block_calls(pipeline.transformer)
            outputs[calibrator] = [pipeline.transformer(x, temb) for x in inputs]
            assert backend.counter.cached_steps == [2, 3]  # as in the TaylorSeer test above
            assert calls[0] == 4 * 3
            backend.disable(pipeline)
    slope = uncached[1] - uncached[0]
    for t in (2, 3):
        torch.testing.assert_close(outputs["none"][t], uncached[1], atol=0, rtol=0)
        torch.testing.assert_close(outputs["taylorseer"][t], uncached[1] + slope * (t - 1))
        # Not what reusing the residual gives: that depends on the step's own input.
        assert not torch.allclose(outputs["none"][t], (inputs[t] + uncached[1] / 2 - inputs[1]) * 2)
    for t in (0, 1, 4, 5):
        torch.testing.assert_close(outputs["none"][t], uncached[t], atol=0, rtol=0)


def test_compute_last_step_false_lets_the_last_step_reuse():
    pipeline = ToyPipeline()
    x, temb = torch.randn(1, 5, 4), torch.ones(1)
    with torch.no_grad():
        backend = _with_tea_cache(pipeline, 1e9, steps=6, warmup_steps=3, compute_last_step=False, reuse="output")
        outputs = [pipeline.transformer(x, temb) for _ in range(6)]
    assert backend.counter.cached_steps == [3, 4, 5]
    assert torch.equal(outputs[5], outputs[2])
    assert backend.hooks[0].tag == "TeaCache_T1000000000.0_W3_OUT_NL"


def test_reuse_output_refuses_a_transformer_that_returns_more_than_a_tensor():
    class TupleTransformer(ToyTransformer):
        def forward(self, hidden_states, temb):
            return (super().forward(hidden_states, temb),)

    pipeline = ToyPipeline()
    pipeline.transformer = TupleTransformer()
    _with_tea_cache(pipeline, 0.25, steps=3, reuse="output")
    with torch.no_grad(), pytest.raises(TypeError, match="reuse='output' needs a transformer that returns one tensor"):
        pipeline.transformer(torch.randn(1, 5, 4), torch.ones(1))


class SignalFreeTransformer(ToyTransformer):
    """Fails if anything reads its TeaCache signal."""

    @staticmethod
    def _teacache_modulated_input(block, hidden_states, temb):
        raise AssertionError("fixed_schedule read the signal")


def test_fixed_schedule_skips_what_warmup_and_cap_allow_and_runs_nothing_of_the_transformer():
    """fixed_schedule: the warm-up, the cap and the last step decide (threshold 0, which would never
    skip, is not read); a skipped step returns the last computed output without entering the
    transformer's forward; computed steps are unchanged."""
    pipeline = ToyPipeline()
    pipeline.transformer = SignalFreeTransformer()
    x, temb = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0)), torch.ones(1)
    inputs = _inputs(x, 7, 0.1)
    with torch.no_grad():
        uncached = [pipeline.transformer(x, temb) for x in inputs]
        backend = _with_tea_cache(pipeline, 0.0, steps=7, warmup_steps=2, max_continuous_cached_steps=2,
                                  reuse="output", fixed_schedule=True)
        forwards = [0]
        original = backend.hooks[0]._original_forward
        def counted(*args, **kwargs):
            forwards[0] += 1
            return original(*args, **kwargs)

        backend.hooks[0]._original_forward = counted
        outputs = [pipeline.transformer(hidden_states=x, temb=temb) for x in inputs]
    assert backend.counter.cached_steps == [2, 3, 5]  # 4 runs after two skips, 6 is the last
    assert forwards[0] == 4
    for t, source in {0: 0, 1: 1, 2: 1, 3: 1, 4: 4, 5: 4, 6: 6}.items():
        torch.testing.assert_close(outputs[t], uncached[source], atol=0, rtol=0)
    assert backend.hooks[0].tag == "TeaCache_T0.0_W2_MC2_OUT_FIXED"


class ToyCFGPipeline(CFGParallelMixin, nn.Module):
    cfg_batched_inputs = ("hidden_states", "temb")

    def __init__(self):
        super().__init__()
        self.transformer = ToyTransformer()


def _guided_steps(pipeline, x, steps: int, scale: float = 4.0) -> list[torch.Tensor]:
    """Each step's guided prediction for one sample whose branches differ in their temb."""
    positive = {"hidden_states": x, "temb": torch.ones(1)}
    negative = {"hidden_states": x, "temb": torch.full((1,), 0.5)}
    return [pipeline.predict_guided_noise(True, [scale], [1], positive, negative)[0] for _ in range(steps)]


def test_cfg_truncation_runs_the_conditional_branch_alone_from_its_step():
    pipeline = ToyCFGPipeline()
    x = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = pipeline.transformer(x, torch.ones(1))
        guided = _guided_steps(pipeline, x, 1)[0]
        assert not torch.allclose(guided, cond)
        backend = _with_tea_cache(pipeline, 0.0, steps=4, cfg_truncation_step=2)
        batches = []
        pipeline.transformer.blocks[0].register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
        outputs = _guided_steps(pipeline, x, 4)
        assert batches == [2, 2, 1, 1] and backend.cached_steps() == 0
        for t, expected in enumerate([guided, guided, cond, cond]):
            torch.testing.assert_close(outputs[t], expected)
        backend.disable(pipeline)
        assert "predict_guided_noise" not in pipeline.__dict__
        # With a fixed schedule: step 1 reuses the guided output, step 2 computes (no output of the
        # halved batch is stored), step 3 reuses the conditional one.
        backend = _with_tea_cache(pipeline, 0.0, steps=4, cfg_truncation_step=2, reuse="output", fixed_schedule=True,
                                  warmup_steps=1, compute_last_step=False, calibrator="none")
        batches.clear()
        outputs = _guided_steps(pipeline, x, 4)
    assert batches == [2, 1] and backend.counter.cached_steps == [1, 3]
    for t, expected in enumerate([guided, guided, cond, cond]):
        torch.testing.assert_close(outputs[t], expected)


def test_cfg_truncation_needs_a_cfg_pipeline():
    with pytest.raises(ValueError, match="cfg_truncation_step needs a pipeline with classifier-free guidance"):
        _with_tea_cache(ToyPipeline(), 0.1, steps=3, cfg_truncation_step=1)
