"""batching="step": requests join and leave a running batch between denoise steps, and every request's
output equals its output run alone (CPU, fp32, tiny random weights)."""

import pytest

from diffserve import Omni
from diffserve.config import OmniDiffusionConfig
from diffserve.engine.admission import admit
from diffserve.engine.step_batching import StepTimes, step_key
from diffserve.request import OmniDiffusionRequest, OmniDiffusionSamplingParams, PromptInput

TOLERANCE = 1e-5


def _request(engine, prompt, seed, steps, negative=None, **params):
    sp = OmniDiffusionSamplingParams(num_inference_steps=steps, max_sequence_length=8, output_type="pt", **params)
    return admit(engine.spec, OmniDiffusionRequest(prompts=[PromptInput(prompt, seed=seed, negative_prompt=negative)],
                                                   sampling_params=sp))


def _run_staggered(engine, arrivals, batcher=None):
    """`arrivals`: {step boundary: [requests]}; each list is added before that boundary's step."""
    batcher = batcher or engine.step_batcher()
    outputs, boundary = {}, 0
    while boundary <= max(arrivals) or not batcher.idle:
        for req in arrivals.get(boundary, []):
            batcher.add(req)
        outputs.update({out.request_id: out for out in batcher.step()})
        boundary += 1
    return outputs, batcher.occupancy


def _max_error_vs_alone(engine, req, out):
    assert out.error is None, out.error
    alone = engine.run_batch([req])[0]  # the request-level path: pipeline.forward on this request only
    return (out.images - alone.images).abs().max().item()


@pytest.fixture(scope="module")
def demo(tiny_checkpoint):
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", batching="step", max_batch_size=4,
              step_max_wait=2, disable_progress_bar=True) as omni:
        yield omni.engine


@pytest.fixture(scope="module")
def flux(tiny_flux):
    with Omni(tiny_flux, dtype="float32", device="cpu", batching="step", max_batch_size=4,
              disable_progress_bar=True) as omni:
        yield omni.engine


# Settings that skip steps on the tiny random weights after one warmup step.
STEP_CACHES = {
    "tea_cache": {"warmup_steps": 1, "rel_l1_thresh": 0.3},
    "cache_dit": {"max_warmup_steps": 1, "residual_diff_threshold": 0.6},
}


def _cached_engine(path, backend):
    return Omni(path, dtype="float32", device="cpu", batching="step", max_batch_size=4, cache_backend=backend,
                cache_config=STEP_CACHES[backend], disable_progress_bar=True)


@pytest.fixture(scope="module", params=list(STEP_CACHES))
def demo_cached(request, tiny_checkpoint):
    with _cached_engine(tiny_checkpoint("demo-dit"), request.param) as omni:
        yield omni.engine


@pytest.fixture(scope="module", params=list(STEP_CACHES))
def flux_cached(request, tiny_flux):
    with _cached_engine(tiny_flux, request.param) as omni:
        yield omni.engine


def _block_rows_per_call(engine) -> list[tuple[int, int]]:
    """(rows of the transformer call, rows its last block ran on), appended as the engine runs. The
    last block is one a cached step skips (cache-dit runs the first Fn blocks on every row)."""
    transformer = engine.executor.worker.pipeline.transformer
    seen, call_rows = [], []
    transformer.register_forward_pre_hook(lambda m, a, k: call_rows.append(k["hidden_states"].shape[0]),
                                          with_kwargs=True)
    transformer.transformer_blocks[-1].register_forward_pre_hook(lambda m, a: seen.append((call_rows[-1],
                                                                                           a[0].shape[0])))
    return seen


def _cached_staggered_equal_alone(engine, **params) -> list[float]:
    """Three requests of 7, 5 and 6 steps joining at boundaries 0, 2 and 3: each skips the steps it
    skips alone with the same cache, and its output equals its output alone; some steps ran the
    skippable blocks on the computing requests' rows only. The max-abs errors."""
    reqs = [_request(engine, p, seed, steps=steps, **params)
            for p, seed, steps in (("a red circle", 1, 7), ("a blue square", 2, 5), ("a green circle", 3, 6))]
    block_rows = _block_rows_per_call(engine)
    outputs, _ = _run_staggered(engine, {0: [reqs[0]], 2: [reqs[1]], 3: [reqs[2]]})
    assert any(ran < rows for rows, ran in block_rows)  # a sub-batch: the others reused their caches
    errors = []
    for req in reqs:
        out = outputs[req.request_id]
        alone = engine.run_batch([req])[0]
        assert out.metrics["cached_steps"] == alone.metrics["cached_steps"] > 0
        errors.append((out.images - alone.images).abs().max().item())
    assert max(errors) <= TOLERANCE, errors
    return errors


def test_demo_step_cache_per_request_equal_alone(demo_cached):
    """Demo model with CFG (TaylorSeer forecasts from its cache defaults). Measured max-abs against
    each request alone with the same cache: tea_cache 2.4e-7, 3.0e-7, 2.4e-7; cache_dit 2.4e-7,
    3.0e-7, 3.0e-7."""
    _cached_staggered_equal_alone(demo_cached, guidance_scale=3.0)


def test_demo_tea_cache_reusing_the_output_per_request_equal_alone(tiny_checkpoint):
    """reuse="output": a skipping request gets its own stored output rows, whether the others in the
    call compute or skip too."""
    config = {**STEP_CACHES["tea_cache"], "reuse": "output", "compute_last_step": False}
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", batching="step", max_batch_size=4,
              cache_backend="tea_cache", cache_config=config, disable_progress_bar=True) as omni:
        _cached_staggered_equal_alone(omni.engine, guidance_scale=3.0)


def test_flux_step_cache_per_request_equal_alone(flux_cached):
    """Tiny FLUX (two block lists, the encoder stream cached too). Measured max-abs against each
    request alone with the same cache: tea_cache 7.7e-7, 6.6e-7, 6.6e-7; cache_dit 6.0e-7, 5.4e-7,
    8.3e-7."""
    _cached_staggered_equal_alone(flux_cached, guidance_scale=3.5)


def test_demo_staggered_mixed_steps_and_cfg_equal_alone(demo):
    """Measured max-abs against each request alone: 3.6e-7, 7.7e-7 and 0.0 (fp32 rounding of the larger
    batch; the last ran alone)."""
    cfg_a = _request(demo, "a red circle", 1, steps=4, guidance_scale=3.0)
    cfg_b = _request(demo, "a blue square", 2, steps=2, guidance_scale=5.0)  # joins mid-denoise
    plain = _request(demo, "a green circle", 3, steps=3, guidance_scale=1.0)  # no CFG: another group
    outputs, occupancy = _run_staggered(demo, {0: [cfg_a], 1: [cfg_b, plain]})
    # cfg_a alone, then cfg_a + cfg_b for two steps, cfg_a alone, then plain's three steps.
    assert occupancy == [1, 2, 2, 1, 1, 1, 1]
    assert outputs[cfg_b.request_id].metrics["step_batch_occupancy"] == [2, 2]
    for req in (cfg_a, cfg_b, plain):
        assert _max_error_vs_alone(demo, req, outputs[req.request_id]) <= TOLERANCE


def test_demo_waiting_request_of_another_key_starts_after_step_max_wait(demo):
    """A stream of compatible arrivals does not starve a request of another key: after step_max_wait=2
    steps the running batch admits no more and drains; the waiting one runs next, then the rest."""
    first = _request(demo, "a red circle", 1, steps=3, guidance_scale=1.0)
    other = _request(demo, "a blue square", 2, steps=2, guidance_scale=3.0)  # CFG on: another key
    late = [_request(demo, "a green circle", 10 + i, steps=3, guidance_scale=1.0) for i in range(3)]
    outputs, occupancy = _run_staggered(demo, {0: [first, other], 1: [late[0]], 2: [late[1]], 3: [late[2]]})
    # first and late[0] run; late[1] arrives after `other` waited 2 steps: not admitted.
    assert occupancy[:4] == [1, 2, 2, 1]
    assert outputs[other.request_id].metrics["step_batch_occupancy"] == [1, 1]
    assert outputs[late[1].request_id].metrics["step_batch_occupancy"] == [2, 2, 2]
    order = list(outputs)
    assert order.index(other.request_id) < order.index(late[1].request_id)


def test_flux_staggered_true_cfg_and_guidance_equal_alone(flux):
    """Tiny FLUX (distilled guidance) with and without true CFG, different step counts and guidance
    scales. Measured max-abs against each request alone: 6.6e-7, 7.7e-7, 7.5e-7 and 1.0e-6."""
    a = _request(flux, "a fox", 1, steps=3, guidance_scale=3.5)
    b = _request(flux, "a car", 2, steps=2, guidance_scale=2.0)
    cfg_a = _request(flux, "a fox", 3, steps=2, negative="blurry", true_cfg_scale=2.0)
    cfg_b = _request(flux, "a dog", 4, steps=3, negative="dark", true_cfg_scale=4.0)
    outputs, occupancy = _run_staggered(flux, {0: [a, cfg_a], 1: [b, cfg_b]})
    assert occupancy == [1, 2, 2, 2, 2, 1]
    for req in (a, b, cfg_a, cfg_b):
        assert _max_error_vs_alone(flux, req, outputs[req.request_id]) <= TOLERANCE


def test_flux_image_to_image_own_strengths_equal_alone(flux):
    """Each request starts part-way into its own schedule (strength is per request). Measured max-abs
    against each request alone: 7.5e-7 and 6.3e-7."""
    from diffserve.testing.conformance import sample_image

    def img2img(seed, steps, strength):
        sp = OmniDiffusionSamplingParams(num_inference_steps=steps, strength=strength, max_sequence_length=8,
                                         output_type="pt")
        prompt = PromptInput("a fox", seed=seed, images=[sample_image(32, 32, seed)])
        return admit(flux.spec, OmniDiffusionRequest(prompts=[prompt], sampling_params=sp))

    a, b = img2img(1, steps=4, strength=0.75), img2img(2, steps=4, strength=0.5)  # 3 and 2 steps
    outputs, occupancy = _run_staggered(flux, {0: [a], 1: [b]})
    assert occupancy == [1, 2, 2]
    for req in (a, b):
        assert _max_error_vs_alone(flux, req, outputs[req.request_id]) <= TOLERANCE


def _saturating(samples: int) -> float:
    """Seconds per step that stop buying throughput at 4 samples: flat up to 4, then linear."""
    return max(1.0, samples / 4)


def _constant(samples: int) -> float:
    """Seconds per step that do not grow with the batch: every sample more is free."""
    return 1.0


def _measured(step_seconds, sizes, **kwargs) -> StepTimes:
    times = StepTimes(**kwargs)
    for samples in sizes:
        for _ in range(2):  # the first is the dropped warm-up
            times.observe("k", samples, step_seconds(samples))
    return times


def test_the_gain_cap_grows_the_batch_while_the_time_per_sample_drops():
    saturating, constant = _measured(_saturating, range(1, 9)), _measured(_constant, range(1, 9))
    assert [saturating.buys_throughput("k", n, n + 1, 0.1) for n in range(1, 8)] == [True] * 3 + [False] * 4
    assert saturating.buys_throughput("k", 2, 4, 0.1)  # a request of two samples
    assert all(constant.buys_throughput("k", n, n + 1, 0.1) for n in range(1, 8))
    assert not constant.buys_throughput("k", 7, 8, 0.2)  # 1/8 is 12.5% under 1/7: not the 20% asked


def test_the_gain_cap_explores_unmeasured_and_stale_sizes_from_a_measured_one():
    times = _measured(_saturating, range(1, 5), stale_after=4)
    assert times.buys_throughput("k", 4, 5, 0.1)  # 5 never measured: explored
    assert not times.buys_throughput("k", 5, 6, 0.1)  # but not on from an unmeasured size
    times.observe("k", 5, 60.0)  # its first step (a recompile, say): dropped
    assert times.buys_throughput("k", 4, 5, 0.1)
    times.observe("k", 5, _saturating(5))
    assert not times.buys_throughput("k", 4, 5, 0.1)
    for _ in range(5):  # 5 is refused, so it is not measured again; its average goes stale
        times.observe("k", 4, _saturating(4))
    assert times.buys_throughput("k", 4, 5, 0.1)  # explored again
    times.observe("k", 5, 1.0)  # faster now: replaces the stale average, not averaged with it
    assert times.measured("k", 5) == 1.0
    assert times.buys_throughput("k", 4, 5, 0.1)


@pytest.fixture(scope="module")
def demo_gain(tiny_checkpoint):
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", batching="step", max_batch_size=6,
              step_min_batch_gain=0.1, disable_progress_bar=True) as omni:
        yield omni.engine


def _batcher_with_step_times(engine, key_request, step_seconds):
    """A batcher whose step times are `step_seconds(samples)`, measured for every size up to 8 and
    reported by every step it runs (instead of the clock), so its decisions are exact."""
    batcher = engine.step_batcher()
    key = step_key(engine.spec, key_request)
    observe = batcher.step_times.observe
    for samples in range(1, 9):
        for _ in range(2):  # the first is the dropped warm-up
            observe(key, samples, step_seconds(samples))
    batcher.step_times.observe = lambda key, samples, seconds: observe(key, samples, step_seconds(samples))
    return batcher


def _requests(engine, count):
    """The first ends after 2 steps, the others after 3."""
    return [_request(engine, "a red circle", i, steps=2 if i == 0 else 3, guidance_scale=1.0) for i in range(count)]


def test_the_gain_cap_holds_the_batch_where_throughput_stops_growing(demo_gain):
    """Per-sample step time flat from 4 samples (max_batch_size=6): 4 of the 5 requests start, the fifth
    joins when the first finishes, and its output equals its output alone (measured max-abs 1.2e-7)."""
    reqs = _requests(demo_gain, 5)
    batcher = _batcher_with_step_times(demo_gain, reqs[0], _saturating)
    outputs, occupancy = _run_staggered(demo_gain, {0: reqs}, batcher)
    assert occupancy == [4, 4, 4, 1, 1]
    assert outputs[reqs[4].request_id].metrics["step_batch_occupancy"] == [4, 1, 1]
    assert _max_error_vs_alone(demo_gain, reqs[4], outputs[reqs[4].request_id]) <= TOLERANCE


def test_the_gain_cap_grows_the_batch_to_max_batch_size_while_each_sample_more_pays(demo_gain):
    reqs = _requests(demo_gain, 7)
    batcher = _batcher_with_step_times(demo_gain, reqs[0], _constant)
    _, occupancy = _run_staggered(demo_gain, {0: reqs}, batcher)
    assert occupancy == [6, 6, 6, 1, 1]  # max_batch_size=6: the seventh joins when the first finishes


def test_refused_configurations(tiny_checkpoint):
    with pytest.raises(ValueError, match="batching must be one of request, step"):
        OmniDiffusionConfig(model="x", batching="token")
    for parallel in ({"cfg_parallel_size": 2}, {"data_parallel_size": 2}):  # the group steps as one
        OmniDiffusionConfig(model="x", batching="step", parallel_config=parallel)
    for key, value, message in (("step_max_batch_tokens", 0, "step_max_batch_tokens must be a positive integer"),
                                ("step_latency_target_ms", -5, "step_latency_target_ms must be a positive number"),
                                ("step_preemption", "yes", "step_preemption must be a bool"),
                                *[("step_min_batch_gain", gain, "step_min_batch_gain must be a number between 0 and 1")
                                  for gain in (0, 1, -0.1, True, "0.1")]):
        with pytest.raises(ValueError, match=message):
            OmniDiffusionConfig(model="x", batching="step", **{key: value})
    OmniDiffusionConfig(model="x", batching="step", step_min_batch_gain=0.05)
    with pytest.raises(ValueError, match="step_min_batch_gain applies to batching='step' only"):
        OmniDiffusionConfig(model="x", step_min_batch_gain=0.05)
    # Pipelines served through the diffusers adapter do not split their call; every native one does.
    with pytest.raises(ValueError, match="not supported by PixArtSigmaPipeline; it is by FluxPipeline, FluxKontext"):
        Omni(tiny_checkpoint("pixart-sigma"), dtype="float32", device="cpu", batching="step")


def test_a_failed_step_answers_its_batch_and_the_next_requests_run(demo, monkeypatch):
    batcher = demo.step_batcher()
    broken = [_request(demo, "a red circle", i, steps=2, guidance_scale=1.0) for i in (1, 2)]
    for req in broken:
        batcher.add(req)
    transformer = demo.executor.worker.pipeline.transformer
    monkeypatch.setattr(transformer, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    outputs = batcher.step()
    assert [(out.request_id, out.error_type) for out in outputs] == [(r.request_id, "internal") for r in broken]
    monkeypatch.undo()
    later = _request(demo, "a blue square", 3, steps=2, guidance_scale=1.0)
    batcher.add(later)
    assert [out.error for out in batcher.run_all()] == [None]


def test_a_parallel_group_steps_together_and_equals_one_process(tiny_checkpoint, demo):
    """Every rank gets the same step_begin / step_run / step_drop sequence (collective_rpc), so the group
    steps as one; here CFG parallel (2 processes), the branches on two ranks. Measured max-abs against
    each request alone in one process: 4.8e-7 and 0.0."""
    with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", batching="step", max_batch_size=4,
              cfg_parallel_size=2, disable_progress_bar=True) as omni:
        a = _request(omni.engine, "a red circle", 1, steps=3, guidance_scale=3.0)
        b = _request(omni.engine, "a blue square", 2, steps=2, guidance_scale=5.0)  # joins after a's first step
        outputs, occupancy = _run_staggered(omni.engine, {0: [a], 1: [b]})
    assert occupancy == [1, 2, 2]
    for req in (a, b):
        assert _max_error_vs_alone(demo, req, outputs[req.request_id]) <= TOLERANCE
