"""Offload through the engine on every conformance model (CPU, fp32, tiny random weights).

On a CPU, offload copies between two host buffers, so every schedule, hook and wrapper runs as on a GPU:
- each mode leaves every model's output bit-identical (measured max-abs 0.0 on all 11 cases, 2026-11-30),
  and each component or block is on the device whenever it runs;
- with each step cache, outputs equal the same cache without offload, and skipped blocks are not
  fetched;
- the start-up memory check names the modes that would fit.
"""

import dataclasses

import pytest
import torch

from diffserve import Omni
from diffserve.offload.budget import MODE_FLAGS, estimate_device_bytes
from diffserve.offload.plan import plan_offload
from diffserve.testing import CONFORMANCE_CASES, load_pipeline, output_tensor
from tests.cache.test_cache_conformance import PERMISSIVE
from tests.distributed.test_parallel import _user_prompts

MODES = {
    "cpu_offload": {"enable_cpu_offload": True},
    "layerwise": {"enable_layerwise_offload": True},
    "layerwise_prefetch0": {"enable_layerwise_offload": True, "layerwise_prefetch": 0},
}


def _scenario(case, steps=2):
    scenario = case.scenario(case.parallel_scenario)
    return dataclasses.replace(scenario, params=dataclasses.replace(scenario.params, num_inference_steps=steps))


def _check_residency(worker) -> list[str]:
    """Hooks, after the offloader's, that check each offloaded module is on the device when it runs."""
    offloader = worker.offloader
    ran = []

    def checker(module, name):
        def hook(m, args):
            assert offloader.is_resident(module), f"{name} ran while its weights were on the host"
            ran.append(name)

        return hook

    for stage in offloader.stages:
        for module in stage.modules:
            targets = [module] if stage.kind != "vae" else list(module.children())  # VAEs run via decode()
            if stage.kind == "dit" and stage.streamer is not None:
                targets = []  # its weights that move are its blocks
            for target in targets:
                target.register_forward_pre_hook(checker(module, stage.name))
    for name, ws in offloader.sets.items():
        block = _module_of(worker.pipeline, name)
        if ".blocks." in name or "_blocks." in name:
            block.register_forward_pre_hook(checker(block, name))
    return ran


def _module_of(pipeline, dotted: str):
    module = pipeline
    for part in dotted.split("."):
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
    return module


def _generate(path, scenario, check=False, **kwargs):
    with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True, **kwargs) as omni:
        worker = omni.engine.executor.worker
        ran = _check_residency(worker) if check else None
        outputs = omni.generate(_user_prompts(scenario), scenario.params)
        if check:
            assert any(".blocks." in r or "_blocks." in r for r in ran) and any(r == "vae" or r == "encoders" for r in ran)
        return torch.cat([output_tensor(out) for out in outputs]), worker


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    results = {}

    def get(case):
        if case.arch not in results:
            results[case.arch] = _generate(tiny_checkpoint(case.arch), _scenario(case))[0]
        return results[case.arch]

    return get


PARAMS = [(case, mode) for case in CONFORMANCE_CASES for mode in ("cpu_offload", "layerwise")]


@pytest.mark.parametrize("case, mode", PARAMS, ids=[f"{c.arch}-{m}" for c, m in PARAMS])
def test_offload_leaves_the_output_unchanged(tiny_checkpoint, reference, case, mode):
    actual, _ = _generate(tiny_checkpoint(case.arch), _scenario(case), check=True, **MODES[mode])
    assert torch.equal(actual, reference(case))


def test_layerwise_without_prefetch(tiny_flux, reference):
    case = CONFORMANCE_CASES[0]
    actual, _ = _generate(tiny_flux, _scenario(case), check=True, **MODES["layerwise_prefetch0"])
    assert torch.equal(actual, reference(case))


# (model, cache, offload mode): each cache with each kind of offload, Wan2.2's two experts included.
CACHED = [
    ("flux", "cache_dit", "layerwise"),
    ("flux", "tea_cache", "layerwise_prefetch0"),
    ("flux", "tea_cache", "cpu_offload"),
    ("wan2.2-t2v", "cache_dit", "layerwise_prefetch0"),
    ("wan2.2-t2v", "cache_dit", "cpu_offload"),
]


@pytest.fixture(scope="module")
def cached_reference(tiny_checkpoint):
    results = {}

    def get(arch, backend, scenario):
        if (arch, backend) not in results:
            cache = {"cache_backend": backend, "cache_config": PERMISSIVE[backend]}
            results[arch, backend] = _generate(tiny_checkpoint(arch), scenario, **cache)[0]
        return results[arch, backend]

    return get


@pytest.mark.parametrize("arch, backend, mode", CACHED, ids=["-".join(c) for c in CACHED])
def test_step_caches_work_under_offload(tiny_checkpoint, cached_reference, arch, backend, mode):
    if backend == "cache_dit":
        pytest.importorskip("cache_dit")
    case = next(c for c in CONFORMANCE_CASES if c.arch == arch)
    scenario = _scenario(case, steps=4)
    expected = cached_reference(arch, backend, scenario)
    moves = []
    with Omni(tiny_checkpoint(arch), dtype="float32", device="cpu", disable_progress_bar=True,
              cache_backend=backend, cache_config=PERMISSIVE[backend], **MODES[mode]) as omni:
        worker = omni.engine.executor.worker
        worker.offloader.transfers.trace = lambda action, name: moves.append((action, name))
        _check_residency(worker)
        outputs = omni.generate(_user_prompts(scenario), scenario.params)
        actual = torch.cat([output_tensor(out) for out in outputs])
        assert outputs[0].metrics["cached_steps"] > 0
        streamers = [s.streamer for s in worker.offloader.stages if s.streamer is not None]
    assert torch.equal(actual, expected)
    if mode == "layerwise_prefetch0":
        # Nothing is fetched ahead, so a block is fetched only to run: skipped blocks never are.
        calls = scenario.params.num_inference_steps
        loads = sum(1 for a, n in moves if a == "load" and "blocks." in n)
        assert loads < sum(len(s.sets) for s in streamers) * calls / len(streamers)


def test_the_memory_check_names_the_modes_that_fit(tiny_flux):
    plan = plan_offload(load_pipeline(tiny_flux))
    flags = {None: "no offload", "model": "--enable-cpu-offload", "layerwise": "--enable-layerwise-offload"}
    kwargs = {None: {}, "model": MODES["cpu_offload"], "layerwise": MODES["layerwise"]}
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
    rests = sum(sum(t.numel() * t.element_size() for t in d.rest) for d in plan.denoisers)
    assert estimate_device_bytes(plan, "layerwise", prefetch=2) == (
        plan.resident_bytes + rests + max(3 * block, plan.encoder_bytes, plan.vae_bytes)
    )
