"""Tiled VAE decoding (distributed/vae_patch.py) equals diffusers' tiled decode, on any number of ranks.

Single-process cases compare against diffusers' own `enable_tiling()` decode of the same VAE. Measured
max-abs differences (fp32, CPU, 2026-11-26): AutoencoderKL 0.0, Wan2.1 VAE 1.2e-7, Wan2.2 VAE (2x2
patchify) 0.0, Qwen-Image VAE 3.0e-8 (2026-11-30); tolerance 1e-5. The multi-rank cases run the whole engine: VAE patch parallel over 2 or
4 ranks (with Ulysses / CFG parallel for the transformer) against the single-process tiled output,
measured 1.4e-6 / 1.1e-6 (tiny FLUX) and 2.9e-6 (tiny Wan2.1), the transformer's parallel rounding;
tolerance 1e-5.
"""

import copy

import pytest
import torch
import torch.nn as nn

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.distributed.parallel_state import get_vae_group
from diffserve.distributed.vae_patch import TILE_LAYOUTS, apply_vae_tiling, tiled_decode

TOLERANCE = 1e-5


def _flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
    )


def _wan_vae(wan22: bool):
    from diffusers import AutoencoderKLWan

    if not wan22:
        return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True])
    return AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16)


def _qwen_image_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


# (name, VAE builder, tiling arguments for enable_tiling, latent shape spanning several uneven tiles)
VAES = [
    ("autoencoder_kl", _flux_vae, {}, (1, 4, 37, 26)),
    ("wan2.1", lambda: _wan_vae(False), dict(tile_sample_min_height=64, tile_sample_min_width=64,
                                             tile_sample_stride_height=48, tile_sample_stride_width=40),
     (1, 4, 2, 17, 13)),
    ("wan2.2", lambda: _wan_vae(True), dict(tile_sample_min_height=128, tile_sample_min_width=128,
                                            tile_sample_stride_height=96, tile_sample_stride_width=96),
     (1, 4, 2, 19, 11)),
    ("qwen-image", _qwen_image_vae, dict(tile_sample_min_height=64, tile_sample_min_width=64,
                                         tile_sample_stride_height=48, tile_sample_stride_width=40),
     (1, 16, 1, 17, 13)),
]


@pytest.mark.parametrize("name, build, tiling, shape", VAES, ids=[v[0] for v in VAES])
def test_tiled_decode_equals_diffusers_tiling(name, build, tiling, shape):
    torch.manual_seed(0)
    vae = build().eval()
    vae.enable_tiling(**tiling)
    z = torch.randn(shape)
    with torch.no_grad():
        expected = copy.deepcopy(vae).decode(z).sample
        layout = TILE_LAYOUTS[type(vae).__name__](vae)
        assert len(range(0, shape[-2], layout.latent_stride[0])) * len(range(0, shape[-1], layout.latent_stride[1])) > 3
        actual = tiled_decode(z, layout, get_vae_group())
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_applied_tiling_leaves_small_latents_untiled_and_tiles_large_ones():
    class Pipe(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = _flux_vae().eval()

    torch.manual_seed(0)
    pipe = Pipe()
    reference = copy.deepcopy(pipe.vae)
    assert apply_vae_tiling(pipe) == 1
    with torch.no_grad():
        small = torch.randn(1, 4, 16, 12)  # within one 16x16 latent tile
        assert torch.equal(pipe.vae.decode(small).sample, reference.decode(small).sample)
        large = torch.randn(1, 4, 40, 24)
        reference.enable_tiling()
        (tiled,) = pipe.vae.decode(large, return_dict=False)
        assert (tiled - reference.decode(large).sample).abs().max().item() <= TOLERANCE


def test_tiling_errors_name_the_problem():
    class NoVae(nn.Module):
        pass

    with pytest.raises(ValueError, match="has no VAE"):
        apply_vae_tiling(NoVae())

    class OddVae(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="VAE class Linear has no tiled decode in diffserve; supported: AutoencoderKL"):
        apply_vae_tiling(OddVae())


def _outputs(path, params, **kwargs):
    with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True, **kwargs) as omni:
        outs = omni.generate({"prompt": "a red fox", "negative_prompt": "blurry"}, params)
    return torch.cat([o.frames if o.frames is not None else o.images for o in outs])


# tiny FLUX: 48x80 pixels = 24x40 latents, 4 tiles of 16 (stride 12) x 4 = 8 tiles.
# tiny Wan2.1: the VAE's 256-pixel tiles (stride 192) need > 256 pixels: 272x32 = 34x4 latents, 2 tiles.
ENGINE_CASES = [
    ("flux", dict(height=48, width=80, true_cfg_scale=4.0), {"vae_patch_parallel_size": 2, "ulysses_degree": 2}),
    ("flux", dict(height=48, width=80, true_cfg_scale=4.0),
     {"vae_patch_parallel_size": 4, "cfg_parallel_size": 2, "ulysses_degree": 2}),
    ("wan2.1-t2v", dict(height=272, width=32, num_frames=5, guidance_scale=4.0),
     {"vae_patch_parallel_size": 2, "cfg_parallel_size": 2}),
    # tiny Qwen-Image: the same 256-pixel tiles; true CFG at its default scale (a negative prompt is given).
    ("qwen-image", dict(height=272, width=32), {"vae_patch_parallel_size": 2, "ulysses_degree": 2}),
]


@pytest.mark.parametrize("arch, size, parallel", ENGINE_CASES,
                         ids=["flux-vae2", "flux-vae4", "wan-vae2", "qwen-image-vae2"])
def test_vae_patch_parallel_equals_single_process_tiling(tiny_checkpoint, arch, size, parallel):
    path = tiny_checkpoint(arch)
    params = OmniDiffusionSamplingParams(num_inference_steps=2, seed=3, output_type="pt", max_sequence_length=16,
                                         **size)
    expected = _outputs(path, params, vae_use_tiling=True)
    untiled = _outputs(path, params)
    assert not torch.equal(expected, untiled)  # the tiles are blended: tiling really happened
    actual = _outputs(path, params, **parallel)
    assert (actual - expected).abs().max().item() <= TOLERANCE
