"""VAE slicing (vae_use_slicing): a batch is encoded and decoded one sample at a time.

It equals diffusers' own `enable_slicing()` (which slices the same way) exactly, and on top of tiling
too; through the engine, a batch of two with slicing equals the batch without it up to the rounding of
batched vs single-sample convolutions (measured max-abs, fp32 CPU, 2026-11-30: tiny FLUX 1.1e-6, Stable
Audio 6.0e-7; tolerance 1e-5).
"""

import copy

import pytest
import torch
import torch.nn as nn

from diffserve import Omni
from diffserve.distributed.vae_patch import apply_vae_slicing, apply_vae_tiling
from diffserve.testing import CONFORMANCE_CASES, output_tensor
from tests.distributed.test_parallel import _user_prompts
from tests.distributed.test_vae_patch import _flux_vae, _wan_vae

TOLERANCE = 1e-5


class Holder(nn.Module):
    """Just a VAE, declared as the pipeline's only component."""

    _vae_modules = ["vae"]
    _dit_modules: list = []
    _encoder_modules: list = []
    _resident_modules: list = []

    def __init__(self, vae):
        super().__init__()
        self.vae = vae


def _batch_sizes_seen(module: nn.Module) -> list[int]:
    sizes = []
    module.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes


VAES = [("autoencoder_kl", _flux_vae, (3, 4, 5, 6), (3, 3, 20, 24)),
        ("wan2.1", lambda: _wan_vae(False), (2, 4, 2, 3, 4), (2, 3, 5, 16, 16))]


@pytest.mark.parametrize("name, build, latent_shape, pixel_shape", VAES, ids=[v[0] for v in VAES])
def test_slicing_equals_diffusers_slicing(name, build, latent_shape, pixel_shape):
    torch.manual_seed(0)
    vae = build().eval()
    reference = copy.deepcopy(vae)
    reference.enable_slicing()
    apply_vae_slicing(Holder(vae))
    decoder_batches = _batch_sizes_seen(vae.decoder)
    z, x = torch.randn(latent_shape), torch.randn(pixel_shape)
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, reference.decode(z).sample)
        assert torch.equal(vae.decode(z, return_dict=False)[0], reference.decode(z).sample)
        ours, theirs = vae.encode(x).latent_dist, reference.encode(x).latent_dist
    assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.std, theirs.std)
    assert set(decoder_batches) == {1}


def test_slicing_over_tiling_equals_diffusers_with_both():
    torch.manual_seed(0)
    vae = _flux_vae().eval()
    reference = copy.deepcopy(vae)
    reference.enable_tiling()
    reference.enable_slicing()
    holder = Holder(vae)
    apply_vae_tiling(holder)
    apply_vae_slicing(holder)
    z = torch.randn(2, 4, 37, 26)  # several tiles per sample
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, reference.decode(z).sample, atol=1e-5, rtol=0)


def test_a_pipeline_without_a_vae_is_refused():
    holder = Holder(None)
    holder._vae_modules = []
    with pytest.raises(ValueError, match="so vae_use_slicing does not apply"):
        apply_vae_slicing(holder)


def _generate(omni, scenario):
    result = omni.generate(_user_prompts(scenario), scenario.params)
    return torch.cat([output_tensor(out) for out in result])


def test_the_flag_slices_a_batch(tiny_flux, flux_omni):
    scenario = CONFORMANCE_CASES[0].scenario(CONFORMANCE_CASES[0].parallel_scenario)  # two prompts
    expected = _generate(flux_omni, scenario)
    with Omni(tiny_flux, dtype="float32", device="cpu", disable_progress_bar=True, vae_use_slicing=True) as omni:
        decoder_batches = _batch_sizes_seen(omni.engine.executor.worker.pipeline.vae.decoder)
        actual = _generate(omni, scenario)
    assert decoder_batches == [1, 1]
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_a_sliced_audio_batch_equals_the_batch(tiny_checkpoint):
    """Stable Audio's Oobleck VAE, sliced on the loaded pipeline as the flag does it."""
    case = next(c for c in CONFORMANCE_CASES if c.arch == "stable-audio")
    scenario = case.scenario(case.parallel_scenario)  # two prompts
    with Omni(tiny_checkpoint("stable-audio"), dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        pipeline = omni.engine.executor.worker.pipeline
        expected = _generate(omni, scenario)
        apply_vae_slicing(pipeline)
        decoder_batches = _batch_sizes_seen(pipeline.vae.decoder)
        actual = _generate(omni, scenario)
    assert set(decoder_batches) == {1}
    assert (actual - expected).abs().max().item() <= TOLERANCE
