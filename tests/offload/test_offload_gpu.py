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


def test_model_level_copies_block_by_block_and_matches():
    device = torch.device("cuda")
    x = torch.randn(64, WIDTH, device=device)
    expected = _run(Pipeline().to(device), x)
    pipeline = Pipeline()
    offloader = Offloader(pipeline, "model", device)
    assert all(ws.chunks[0].host.is_pinned() for ws in offloader.sets.values() if ws.nbytes)
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


@pytest.mark.parametrize("offload", [{"enable_cpu_offload": True}, {"enable_layerwise_offload": True}])
def test_engine_on_cuda_matches_and_reports_peaks(tiny_flux, offload):
    from diffserve import Omni, OmniDiffusionSamplingParams

    params = OmniDiffusionSamplingParams(num_inference_steps=2, max_sequence_length=8, seed=0, output_type="pt")
    outputs = []
    for kwargs in ({}, offload):
        with Omni(tiny_flux, dtype="float32", device="cuda", enforce_eager=True, disable_progress_bar=True,
                  **kwargs) as omni:
            out = omni.generate("a fox", params)[0]
            outputs.append(out.images)
            for key in ("encode_peak_gpu_bytes", "denoise_peak_gpu_bytes", "decode_peak_gpu_bytes", "peak_gpu_bytes"):
                assert out.metrics[key] > 0
    assert torch.equal(outputs[0], outputs[1])
