"""Offload on a GPU: pinned host memory, side-stream copies, the memory layerwise offload saves, and
regional compile with inductor. Skipped without CUDA (the schedule itself is tested on the CPU)."""

import pytest
import torch
import torch.nn as nn

from diffserve.offload import Offloader

pytestmark = pytest.mark.gpu

WIDTH = 2048  # a block: two 2048 x 2048 float32 linears, 32 MiB
DEPTH = 12


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, WIDTH)
        self.down = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.down(torch.nn.functional.gelu(self.up(hidden_states)))


class DiT(nn.Module):
    _repeated_blocks = ["Block"]

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.norm(hidden_states)


class Pipeline(nn.Module):
    _dit_modules = ["transformer"]
    _encoder_modules: list = []
    _vae_modules: list = []
    _resident_modules: list = []

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = DiT().requires_grad_(False)


def _block_bytes() -> int:
    return 2 * (WIDTH * WIDTH + WIDTH) * 4


def _run(pipeline, x, steps=3):
    with torch.inference_mode():
        for _ in range(steps):
            x = pipeline.transformer(x)
    return x


@pytest.mark.parametrize("prefetch", [1, 2])
def test_layerwise_holds_prefetch_plus_one_blocks_and_matches(prefetch):
    device = torch.device("cuda")
    x = torch.randn(64, WIDTH, device=device)
    expected = _run(Pipeline().to(device), x)
    pipeline = Pipeline()
    Offloader(pipeline, "layerwise", device, prefetch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = _run(pipeline, x)
    torch.cuda.synchronize()
    held = torch.cuda.max_memory_allocated() - base
    assert torch.equal(out, expected)
    activations = 4 * x.numel() * 4  # a few [64, WIDTH] tensors alive at once
    assert held <= (prefetch + 1) * _block_bytes() + activations, (held, _block_bytes())
    assert held < DEPTH * _block_bytes() / 3


def test_resident_blocks_stay_on_the_gpu_and_the_others_stream():
    device = torch.device("cuda")
    x = torch.randn(64, WIDTH, device=device)
    expected = _run(Pipeline().to(device), x)
    pipeline = Pipeline()
    offloader = Offloader(pipeline, "layerwise", device, 1, resident_blocks=4)
    kept = {id(b.module) for b in offloader.resident_blocks["transformer"]}
    assert len(kept) == 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = _run(pipeline, x)
    torch.cuda.synchronize()
    held = torch.cuda.max_memory_allocated() - base
    assert torch.equal(out, expected)
    # Between calls: the kept blocks on the GPU, and the first streamed one (fetched for the next call);
    # the others on the host.
    blocks = list(pipeline.transformer.blocks)
    first_streamed = next(b for b in blocks if id(b) not in kept)
    for block in blocks:
        on_gpu = id(block) in kept or block is first_streamed
        assert all(p.is_cuda == on_gpu for p in block.parameters())
    activations = 4 * x.numel() * 4
    # base already holds the 4 kept blocks; the streamed ones come 2 at a time (prefetch 1).
    assert held <= 2 * _block_bytes() + activations, (held, _block_bytes())
    assert offloader.streamed_bytes_per_call == {"transformer": (DEPTH - 4) * _block_bytes()}


def test_model_level_copies_block_by_block_and_matches():
    device = torch.device("cuda")
    x = torch.randn(64, WIDTH, device=device)
    expected = _run(Pipeline().to(device), x)
    pipeline = Pipeline()
    offloader = Offloader(pipeline, "model", device)
    assert all(offloader.pinning.holds(ws.chunks[0].host) for ws in offloader.sets.values() if ws.nbytes)
    out = _run(pipeline, x)
    assert torch.equal(out, expected)
    assert all(ws.resident for ws in offloader.sets.values())
    offloader.remove()
    assert all(p.is_cuda for p in pipeline.parameters())
    assert torch.equal(_run(pipeline, x), expected)


def test_layerwise_under_regional_compile(monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    device = torch.device("cuda")
    x = torch.randn(64, WIDTH, device=device)
    reference = Pipeline().to(device)
    for block in reference.transformer.blocks:
        block.compile()
    expected = _run(reference, x)
    pipeline = Pipeline()
    for block in pipeline.transformer.blocks:
        block.compile()
    Offloader(pipeline, "layerwise", device, 1)
    _run(pipeline, x)  # compile
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch.testing.assert_close(_run(pipeline, x), expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


OFFLOAD = {"model": {"enable_cpu_offload": True}, "layerwise": {"enable_layerwise_offload": True}}
# One model per pipeline class, Wan2.1 image-to-video for its CLIP image encoder.
ARCHS = ["flux", "flux-kontext", "demo-dit", "sd3-medium", "wan2.2-t2v", "wan2.1-i2v", "wan2.2-i2v", "stable-audio",
         "qwen-image", "qwen-image-edit-plus"]


def _generate(path, arch, **kwargs):
    """(output, metrics) of the arch's conformance scenario, 2 steps, on CUDA (fp32 unless `dtype`, eager)."""
    import dataclasses

    from diffserve import Omni
    from diffserve.testing import CONFORMANCE_CASES, output_tensor
    from tests.distributed.test_parallel import _user_prompts

    case = next(c for c in CONFORMANCE_CASES if c.arch == arch)
    scenario = case.scenario(case.parallel_scenario)
    params = dataclasses.replace(scenario.params, num_inference_steps=2)
    kwargs = {"dtype": "float32", **kwargs}
    with Omni(path, device="cuda", enforce_eager=True, disable_progress_bar=True, **kwargs) as omni:
        outputs = omni.generate(_user_prompts(scenario), params)
    return torch.cat([output_tensor(out) for out in outputs]), outputs[0].metrics


@pytest.mark.parametrize("arch", ARCHS)
def test_every_model_on_cuda_is_unchanged_by_offload_and_reports_peaks(tiny_checkpoint, arch):
    """Components and blocks move between host and GPU: every input a pipeline makes lands on the GPU."""
    if arch == "stable-audio":
        pytest.importorskip("torchsde", reason="Stable Audio's scheduler needs torchsde")
    path = tiny_checkpoint(arch)
    expected, metrics = _generate(path, arch)
    assert metrics["peak_gpu_bytes"] > 0 and metrics["denoise_peak_gpu_bytes"] > 0
    for mode, flags in OFFLOAD.items():
        actual, metrics = _generate(path, arch, **flags)
        assert torch.equal(actual, expected), mode
        assert metrics["peak_gpu_bytes"] > 0


@pytest.mark.parametrize("with_lora", [False, True], ids=["fp8", "fp8+lora"])
def test_fp8_and_lora_under_offload_on_cuda(tiny_flux, tmp_path, with_lora):
    """FP8 weights (and their scales) move like any other; adapters stay on the GPU. The weights are
    quantized on the GPU in every mode: quantized in host memory, some scales differed in their last bit
    and the output by 0.09 (H200, 2026-11-30)."""
    from diffserve.testing.lora import write_random_lora

    base = {"quantization": "fp8", "dtype": "bfloat16"}
    if with_lora:
        base["lora_modules"] = {"a": write_random_lora(tiny_flux, str(tmp_path / "a.safetensors"),
                                                       ("to_q", "to_out.0", "proj_mlp"))}
    expected, _ = _generate(tiny_flux, "flux", **base)
    for mode, flags in OFFLOAD.items():
        actual, _ = _generate(tiny_flux, "flux", **base, **flags)
        assert torch.equal(actual, expected), mode
