import logging

import pytest
import torch

from diffserve.layers.attention import Attention, backend_names, select_attention_backend, set_attention_backend
from diffserve.layers.attention.backends.sdpa import TorchSDPABackend


def naive_attention(q, k, v, mask=None):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_attention_layout_matches_naive():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8) for _ in range(3))
    out = Attention(num_heads=3, head_size=8)(q, k, v)
    assert out.shape == (2, 7, 3, 8)
    torch.testing.assert_close(out, naive_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_key_padding_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 4) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = Attention(num_heads=2, head_size=4)(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_bad_mask_shape_is_an_error():
    q = torch.randn(1, 3, 1, 4)
    with pytest.raises(ValueError, match="attention mask must be"):
        Attention(1, 4)(q, q, q, attn_mask=torch.ones(1, 3, 3, dtype=torch.bool))


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown attention backend 'flashy'.*sdpa"):
        select_attention_backend("flashy", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("name", [n for n in backend_names() if n != "sdpa"])
def test_unavailable_backend_falls_back_to_sdpa_with_reason(name, caplog):
    with caplog.at_level(logging.WARNING, logger="diffserve"):
        backend = select_attention_backend(name, torch.device("cpu"), torch.float32)
    assert backend is TorchSDPABackend
    assert f"attention backend '{name}' cannot run here (needs CUDA" in caplog.text


def test_set_attention_backend_reaches_every_layer():
    model = torch.nn.Sequential(Attention(1, 4), torch.nn.Sequential(Attention(2, 4)))
    assert set_attention_backend(model, TorchSDPABackend) == 2


def test_engine_uses_configured_backend(tiny_flux, caplog):
    from diffserve import Omni

    with caplog.at_level(logging.WARNING, logger="diffserve"):
        with Omni(tiny_flux, dtype="float32", device="cpu", attention_backend="flash_attn") as omni:
            layers = [m for m in omni.engine.executor.worker.pipeline.modules() if isinstance(m, Attention)]
    assert layers and all(layer.backend is TorchSDPABackend for layer in layers)
    assert "falling back to 'sdpa'" in caplog.text
