"""What only a CUDA machine shows: regional compile, NCCL collectives under every parallel mode
(Ulysses, ring on cuDNN attention, CFG, TP, HSDP's FSDP2), on the trained demo model in bf16.

Skipped without CUDA (the `gpu` marker); the multi-GPU cases also need two devices. Run on the GPU
machine with `pytest -m gpu tests/gpu`. Each output is compared with one GPU, eager, as PSNR over the
[0, 1] pixels: bf16 rounds differently when work is split (ring merges partial outputs by LSE in
fp32; TP and HSDP sum in another order), but an image that is the same picture stays far above 30 dB.
Measured values are noted in benchmarks/RESULTS.md with each run.
"""

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.assets import DEMO_MODEL_DIR

pytestmark = pytest.mark.gpu

PROMPTS = [{"prompt": "a red circle above a blue square", "seed": 1},
           {"prompt": "a green triangle left of a yellow circle", "seed": 2}]
MIN_PSNR_DB = 30.0
PARALLEL_MODES = {
    "ulysses2": {"ulysses_degree": 2},
    "ring2": {"ring_degree": 2},  # cuDNN attention returning the LSE
    "cfg2": {"cfg_parallel_size": 2},
    "tp2": {"tensor_parallel_size": 2},
    "hsdp2": {"use_hsdp": True, "hsdp_shard_size": 2},  # FSDP2 over NCCL
    # Two replicas, one GPU each (replica 1 on cuda:1); batches of one, so each draws one prompt.
    "dp2": {"data_parallel_size": 2, "max_batch_size": 1},
}


def _images(**config) -> torch.Tensor:
    params = OmniDiffusionSamplingParams(output_type="pt")
    with Omni(DEMO_MODEL_DIR, device="cuda", dtype="bfloat16", disable_progress_bar=True, **config) as omni:
        return torch.cat([out.images.float().cpu() for out in omni.generate(PROMPTS, params)])


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


@pytest.fixture(scope="module")
def eager_one_gpu() -> torch.Tensor:
    return _images(enforce_eager=True)


def test_regional_compile_draws_the_eager_picture(eager_one_gpu):
    psnr = _psnr(_images(enforce_eager=False), eager_one_gpu)
    print(f"compiled vs eager: {psnr:.1f} dB")
    assert psnr > MIN_PSNR_DB


@pytest.mark.parametrize("mode", PARALLEL_MODES)
def test_parallel_mode_over_nccl_draws_the_one_gpu_picture(eager_one_gpu, mode):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    psnr = _psnr(_images(enforce_eager=True, **PARALLEL_MODES[mode]), eager_one_gpu)
    print(f"{mode} vs one GPU: {psnr:.1f} dB")
    assert psnr > MIN_PSNR_DB
