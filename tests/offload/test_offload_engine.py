"""Offload through the engine on one model of each pipeline family (CPU, fp32, tiny random weights).

On a CPU, offload copies between two host buffers, so every schedule, hook and wrapper runs as on a GPU
(tests/offload/test_offload_gpu.py runs the models on CUDA, where the device matters too). To stay
fast, each model loads once: its output without offload, then with each mode applied to the loaded
pipeline as the worker applies it, then with offload removed again; the flags themselves are checked
on the demo model.
- each mode leaves every model's output bit-identical (measured max-abs 0.0 on every model,
  2026-12-01), and each component or block is on the device whenever it runs;
- with each step cache, outputs equal the same cache without offload, and skipped blocks are not
  fetched;
- the start-up memory check names the modes that would fit.
"""

import dataclasses

import pytest
import torch

from diffserve import Omni
from diffserve.offload import Offloader
from diffserve.layers.quantization import quantize_linear_layers
from diffserve.offload.budget import MODE_FLAGS, estimate_device_bytes, weight_sizes
from diffserve.offload.plan import plan_offload
from diffserve.testing import CONFORMANCE_CASES, load_pipeline, output_tensor
from tests.cache.test_cache_conformance import PERMISSIVE
from tests.distributed.test_parallel import _user_prompts

# (mode, layerwise_prefetch); prefetch 0 on every model adds nothing the cache test does not cover.
MODES = [("model", 1), ("layerwise", 1)]
CACHE_MODES = MODES + [("layerwise", 0)]
# One model per pipeline family (FLUX.1 Kontext is FLUX with a VAE encode, which Wan2.2 I2V covers);
# Wan2.2 for its two experts, Qwen-Image for its VL encoder, whose language model it calls directly.
ARCHS = ["flux", "demo-dit", "sd3-medium", "wan2.2-t2v", "wan2.2-i2v", "stable-audio", "qwen-image"]


def _scenario(arch, steps=2):
    case = next(c for c in CONFORMANCE_CASES if c.arch == arch)
    scenario = case.scenario(case.parallel_scenario)
    return dataclasses.replace(scenario, params=dataclasses.replace(scenario.params, num_inference_steps=steps))


def _run(omni, scenario):
    outputs = omni.generate(_user_prompts(scenario), scenario.params)
    return torch.cat([output_tensor(out) for out in outputs]), outputs[0].metrics


def _module_of(pipeline, dotted: str):
    module = pipeline
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _check_residency(pipeline, offloader):
    """Hooks, run after the offloader's, that check each offloaded component or block is on the device
    when it runs; returns (names of what ran, the hooks' handles)."""
    ran, handles = [], []

    def watch(target, owner, name):
        def hook(module, args):
            assert offloader.is_resident(owner), f"{name} ran while its weights were on the host"
            ran.append(name)

        handles.append(target.register_forward_pre_hook(hook))

    for stage in offloader.stages:
        if stage.streamer is not None:
            continue  # a layerwise denoiser: what moves is its blocks, watched below
        for module in stage.modules:
            # A denoiser runs its forward; encoders and VAEs run their parts (a VAE is entered through
            # encode/decode, and Qwen-Image calls its encoder's language model directly).
            for target in (module.children() if stage.kind != "dit" else [module]):
                watch(target, module, stage.name)
    for name in offloader.sets:
        if "blocks." in name:
            block = _module_of(pipeline, name)
            watch(block, block, name)
    return ran, handles


def _check_streamed_once(offloader, moves, ran):
    """Model-level: each denoiser (each of Wan2.2's experts) is copied once per request, and each of its
    blocks is waited for once, in its first call, just before it first runs (`ran` lists what ran)."""
    blocks = [name for name in offloader.sets if "blocks." in name]
    assert all(moves.count(("load", b)) == 1 and moves.count(("wait", b)) == 1 for b in blocks)
    waited = [name for action, name in moves if action == "wait" and name in blocks]
    first_runs = list(dict.fromkeys(name for name in ran if name in blocks))
    assert waited == first_runs


@pytest.mark.parametrize("arch", ARCHS)
def test_each_mode_leaves_the_output_unchanged_and_removing_it_restores_the_model(tiny_checkpoint, arch):
    scenario = _scenario(arch)
    with Omni(tiny_checkpoint(arch), dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        worker = omni.engine.executor.worker
        expected, _ = _run(omni, scenario)
        # (After a first run: transformers adds output-recording hooks to its encoders on first use.)
        modules = list(worker.pipeline.modules())
        hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
        for mode, prefetch in MODES:
            moves = []
            offloader = Offloader(worker.pipeline, mode, worker.device, prefetch, trace=lambda *move: moves.append(move))
            ran, handles = _check_residency(worker.pipeline, offloader)
            actual, _ = _run(omni, scenario)
            assert torch.equal(actual, expected), (mode, prefetch)
            assert any("blocks." in name for name in ran) and "encoders" in ran
            if mode == "model":
                _check_streamed_once(offloader, moves, ran)
            for handle in handles:
                handle.remove()
            offloader.remove()
            assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == hooks
        assert torch.equal(_run(omni, scenario)[0], expected)


@pytest.mark.parametrize("backend", ["cache_dit", "tea_cache"])
def test_step_caches_work_under_offload(tiny_flux, backend):
    if backend == "cache_dit":
        pytest.importorskip("cache_dit")
    scenario = _scenario("flux", steps=4)
    with Omni(tiny_flux, dtype="float32", device="cpu", disable_progress_bar=True,
              cache_backend=backend, cache_config=PERMISSIVE[backend]) as omni:
        worker = omni.engine.executor.worker
        expected, metrics = _run(omni, scenario)
        assert metrics["cached_steps"] > 0
        for mode, prefetch in CACHE_MODES:
            moves = []
            offloader = Offloader(worker.pipeline, mode, worker.device, prefetch,
                                  trace=lambda action, name: moves.append((action, name)))
            _, handles = _check_residency(worker.pipeline, offloader)
            actual, metrics = _run(omni, scenario)
            assert torch.equal(actual, expected), (mode, prefetch)
            assert metrics["cached_steps"] > 0
            if prefetch == 0:
                # Nothing is fetched ahead, so a block is fetched only to run: skipped blocks never are.
                (streamer,) = [s.streamer for s in offloader.stages if s.streamer is not None]
                loads = sum(1 for action, name in moves if action == "load" and "blocks." in name)
                assert loads < len(streamer.sets) * scenario.params.num_inference_steps
            for handle in handles:
                handle.remove()
            offloader.remove()


def test_the_memory_check_names_the_modes_that_fit(tiny_flux):
    plan = plan_offload(load_pipeline(tiny_flux))
    flags = {None: "no offload", "model": "--enable-cpu-offload", "layerwise": "--enable-layerwise-offload"}
    kwargs = {None: {}, "model": {"enable_cpu_offload": True}, "layerwise": {"enable_layerwise_offload": True}}
    needed = {mode: estimate_device_bytes(plan, mode) for mode in flags}
    # (Tiny FLUX's text encoders outweigh its transformer, so layerwise is not the smallest here.)
    smallest, *others = sorted(needed, key=needed.get)
    assert needed[smallest] < needed[others[0]]
    budget = (needed[smallest] + needed[others[0]]) / 2 / 1024**3
    with pytest.raises(ValueError) as error:
        Omni(tiny_flux, dtype="float32", device="cpu", max_gpu_memory=budget, **kwargs[others[-1]])
    message = str(error.value)
    assert f"with {MODE_FLAGS[others[-1]]}, more than" in message and f"{flags[smallest]}" in message
    assert flags[others[0]] not in message.split("fit:")[1]
    with pytest.raises(ValueError, match="no offload mode fits"):
        Omni(tiny_flux, dtype="float32", device="cpu", max_gpu_memory=needed[smallest] / 2 / 1024**3)
    with Omni(tiny_flux, dtype="float32", device="cpu", max_gpu_memory=budget, **kwargs[smallest]):
        pass


def test_estimates_follow_the_plan(tiny_checkpoint):
    plan = plan_offload(load_pipeline(tiny_checkpoint("wan2.2-t2v")))
    dits = [d.nbytes for d in plan.denoisers]
    assert estimate_device_bytes(plan, None) == plan.resident_bytes + plan.encoder_bytes + plan.vae_bytes + sum(dits)
    # Model-level: the largest stage, one expert at a time.
    assert estimate_device_bytes(plan, "model") == plan.resident_bytes + max(plan.encoder_bytes, plan.vae_bytes, *dits)
    block = max(d.largest_block_bytes for d in plan.denoisers)
    rests = sum(d.rest_bytes for d in plan.denoisers)
    assert estimate_device_bytes(plan, "layerwise", prefetch=2) == (
        plan.resident_bytes + rests + max(3 * block, plan.encoder_bytes, plan.vae_bytes)
    )


def test_fp8_weights_count_at_their_quantized_size(tiny_flux):
    pipeline = load_pipeline(tiny_flux)
    estimated = plan_offload(pipeline, weight_sizes(pipeline, "fp8")).denoisers[0].nbytes
    before = plan_offload(pipeline).denoisers[0].nbytes
    assert quantize_linear_layers(pipeline.transformer, "fp8") > 0
    # What the transformer holds once quantized (fp8 weights and their scales), known before loading.
    assert plan_offload(pipeline).denoisers[0].nbytes == estimated < before


def test_lora_adapters_under_offload(tiny_flux, tmp_path):
    """Adapters stay on the device while the layers they adapt come and go."""
    from diffserve.testing.lora import write_random_lora

    adapter = write_random_lora(tiny_flux, str(tmp_path / "a.safetensors"), ("to_q", "to_out.0", "proj_mlp"))
    scenario = _scenario("flux")
    with_adapter = dataclasses.replace(scenario, params=dataclasses.replace(scenario.params, lora={"a": 1.0}))
    outputs = {}
    for name, flags in (("none", {}), ("layerwise", {"enable_layerwise_offload": True})):
        with Omni(tiny_flux, dtype="float32", device="cpu", disable_progress_bar=True, lora_modules={"a": adapter},
                  **flags) as omni:
            outputs[name] = _run(omni, with_adapter)[0]
            if name == "layerwise":
                without = _run(omni, scenario)[0]
    assert torch.equal(outputs["layerwise"], outputs["none"])
    assert (outputs["none"] - without).abs().max() > 1e-3


def test_the_flags_turn_offload_on_and_fp8_weights_move_like_any_other(tiny_checkpoint):
    """Through the engine's flags; FP8 weights and their scales are offloaded together."""
    scenario = _scenario("demo-dit")
    outputs = []
    for flags, mode in (({}, None), ({"enable_layerwise_offload": True, "layerwise_prefetch": 0}, "layerwise"),
                        ({"enable_cpu_offload": True}, "model")):
        with Omni(tiny_checkpoint("demo-dit"), dtype="float32", device="cpu", disable_progress_bar=True,
                  quantization="fp8", **flags) as omni:
            offloader = omni.engine.executor.worker.offloader
            assert (offloader and offloader.mode) == mode
            assert all(s.streamer.prefetch == 0 for s in (offloader.stages if offloader else []) if s.streamer)
            outputs.append(_run(omni, scenario)[0])
    assert torch.equal(outputs[1], outputs[0]) and torch.equal(outputs[2], outputs[0])


@pytest.mark.parametrize("mode", ["model", "layerwise"])
def test_the_encoders_go_when_the_denoise_stage_starts(tiny_flux, mode):
    """Before the stage's memory is measured, not at the first transformer call inside it."""
    scenario = _scenario("flux")
    with Omni(tiny_flux, dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        worker = omni.engine.executor.worker
        expected, _ = _run(omni, scenario)
        moves = []
        offloader = Offloader(worker.pipeline, mode, worker.device, 1, trace=lambda *move: moves.append(move))
        make_timer = worker.pipeline.stage_timer

        def marked_timer():
            timer = make_timer()
            started = timer.on_stage
            timer.on_stage = lambda name: (moves.append(("stage", name)), started(name))
            return timer

        worker.pipeline.stage_timer = marked_timer
        actual, _ = _run(omni, scenario)
        worker.pipeline.stage_timer = make_timer  # the offloader's wrapper, which remove() takes away
        offloader.remove()
    assert torch.equal(actual, expected)
    start = moves.index(("stage", "denoise"))
    encoder_sets = {ws.name for stage in offloader.stages if stage.kind == "encoder" for ws in stage.sets}
    encoders = {name for action, name in moves[:start] if action == "load" and name in encoder_sets}
    assert encoders and {name for action, name in moves[start + 1 : start + 1 + len(encoders)]} == encoders
    assert all(action == "release" for action, _ in moves[start + 1 : start + 1 + len(encoders)])
