"""Feed-forward chunking along the tokens (ffn_chunk_size), alone and with layerwise offload and
resident blocks, on the CPU in float32.

Chunking runs the same per-token matmuls on fewer rows at a time: equal to the unchunked layer up to
matmul rounding. Measured (2026-11-30): max-abs 0.0 for the layers below; on the tiny Wan2.2 video
the latents the VAE decodes differ by 2.4e-6 at a largest magnitude of 10.8 (2.2e-7 relative, float32
rounding). Tolerances: 1e-5 absolute for the layers, 1e-5 relative to the largest latent for the
model (its random-weight VAE magnifies such differences, so the decoded video is not compared).
Offload with the same chunking stays bit-identical, video included.
"""

import pytest
import torch

from diffserve import Omni
from diffserve.layers.mlp import FeedForward, GatedFeedForward, set_ffn_chunk_size
from diffserve.models.interface import discover_components
from tests.offload.test_offload_engine import _run, _scenario

TOLERANCE = 1e-5


@pytest.mark.parametrize("layer", [FeedForward(16, 64, dim_out=24), GatedFeedForward(16, 32)])
def test_a_chunked_feed_forward_equals_the_whole_one(layer):
    torch.manual_seed(0)
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 37, 16)
    expected = layer(x)
    for size in (1, 8, 36):  # one token, an uneven last chunk, a last chunk of one
        assert set_ffn_chunk_size(layer, size) == 1
        calls = []
        handle = layer.proj_in.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[-2]))
        actual = layer(x)
        handle.remove()
        assert calls == [size] * (37 // size) + ([37 % size] if 37 % size else [])
        assert actual.shape == expected.shape and (actual - expected).abs().max() <= TOLERANCE
    set_ffn_chunk_size(layer, None)
    assert torch.equal(layer(x), expected)


def test_chunking_through_the_engine_with_layerwise_offload_and_resident_blocks(tiny_checkpoint):
    """One engine with the flags: its output equals the same chunking without offload bit for bit, and
    the unchunked model within the tolerance."""
    scenario = _scenario("wan2.2-t2v")
    with Omni(tiny_checkpoint("wan2.2-t2v"), dtype="float32", device="cpu", disable_progress_bar=True,
              ffn_chunk_size=3, enable_layerwise_offload=True, layerwise_resident_blocks=1) as omni:
        worker = omni.engine.executor.worker
        denoisers = discover_components(worker.pipeline)["dit"].values()
        ffns = [m for d in denoisers for m in d.modules() if isinstance(m, FeedForward)]
        assert ffns and all(m.chunk_size == 3 for m in ffns)
        assert [len(b) for b in worker.offloader.resident_blocks.values()] == [1, 1]  # both experts
        tokens = []
        ffns[0].register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[-2]))
        latents = _capture_latents(worker.pipeline)
        offloaded, _ = _run(omni, scenario)
        assert max(tokens) > 3  # the sequence was chunked
        worker.offloader.remove()  # (its removal takes the capturing wrapper with its own)
        _capture_latents(worker.pipeline, latents)
        chunked, _ = _run(omni, scenario)
        for d in denoisers:
            set_ffn_chunk_size(d, None)
        _run(omni, scenario)
    assert torch.equal(offloaded, chunked) and torch.equal(latents[0], latents[1])
    assert (latents[1] - latents[2]).abs().max() <= TOLERANCE * latents[2].abs().max()


def _capture_latents(pipeline, seen: list | None = None) -> list[torch.Tensor]:
    """Every latent tensor the pipeline's VAE decodes, appended to `seen`."""
    seen = [] if seen is None else seen
    decode = pipeline.vae.decode

    def capturing(z, *args, **kwargs):
        seen.append(z.clone())
        return decode(z, *args, **kwargs)

    pipeline.vae.decode = capturing
    return seen


def test_the_options_are_checked():
    from diffserve.config import OmniDiffusionConfig

    for value in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="ffn_chunk_size must be None or a positive number of tokens"):
            OmniDiffusionConfig(model="m", ffn_chunk_size=value)
    for value in (-1, 1.0, True):
        with pytest.raises(ValueError, match="layerwise_resident_blocks must be an integer >= 0"):
            OmniDiffusionConfig(model="m", enable_layerwise_offload=True, layerwise_resident_blocks=value)
    with pytest.raises(ValueError, match="only meaningful with enable_layerwise_offload"):
        OmniDiffusionConfig(model="m", enable_cpu_offload=True, layerwise_resident_blocks=2)
