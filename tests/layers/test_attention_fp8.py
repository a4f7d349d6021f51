"""FP8 attention (attention_backend="cudnn_fp8"): the arithmetic on the CPU, the cuDNN kernel on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from diffserve.layers.attention.backends.cudnn_fp8 import (
    FP8,
    CudnnFp8AttentionBackend,
    fp8_attention_reference,
    quantize_attention_inputs,
    quantize_fp8_per_tensor,
)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _exact(q, k, v, causal=False):
    return F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)


def _inputs(shape=(2, 256, 4, 64), key_bias=3.0, device="cpu", dtype=torch.float32):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device=device) for _ in range(3))
    # A per-channel offset of the keys, as trained models have: centring removes it before rounding.
    k = k + key_bias * torch.randn(1, 1, shape[2], shape[3], generator=gen, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_per_tensor_quantization_round_trips_within_fp8_precision():
    x = torch.randn(3, 50, 2, 16) * 7
    q, descale = quantize_fp8_per_tensor(x)
    assert q.dtype == FP8 and descale.shape == (1, 1, 1, 1)
    assert q.float().abs().max().item() == torch.finfo(FP8).max  # the largest value uses the whole range
    assert _rel(q.float() * descale, x) < 0.03  # e4m3 keeps 3 mantissa bits; measured 2.2e-2


@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_attention_within_fp8_error(causal):
    q, k, v = _inputs()
    out = fp8_attention_reference(*quantize_attention_inputs(q, k, v), 64**-0.5, causal, torch.float32)
    # Measured 5.3e-2 (non-causal) against exact float32 attention; bf16 attention is 6e-3.
    assert _rel(out, _exact(q, k, v, causal)) < 0.08


def test_centring_the_keys_leaves_attention_unchanged_and_halves_the_error():
    q, k, v = _inputs()
    centred = k - k.mean(dim=1, keepdim=True)
    torch.testing.assert_close(_exact(q, centred, v), _exact(q, k, v), atol=1e-5, rtol=1e-5)
    plain = [quantize_fp8_per_tensor(t) for t in (q, k, v)]
    uncentred = fp8_attention_reference(*(p[0] for p in plain), *(p[1] for p in plain), 64**-0.5, False, torch.float32)
    with_centring = fp8_attention_reference(*quantize_attention_inputs(q, k, v), 64**-0.5, False, torch.float32)
    # Measured 9.2e-2 without centring, 5.3e-2 with it.
    assert _rel(with_centring, _exact(q, k, v)) < 0.7 * _rel(uncentred, _exact(q, k, v))


def test_unavailable_without_hopper_or_cudnn_frontend():
    assert "needs CUDA" in CudnnFp8AttentionBackend.unavailable_reason(torch.device("cpu"), torch.bfloat16)


def _skip_unless_runnable():
    reason = CudnnFp8AttentionBackend.unavailable_reason(torch.device("cuda"), torch.bfloat16)
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_kernel_is_as_accurate_as_the_reference(causal):
    _skip_unless_runnable()
    q, k, v = _inputs((2, 1024, 8, 128), device="cuda", dtype=torch.bfloat16)
    out = CudnnFp8AttentionBackend.forward(q, k, v, None, 128**-0.5, causal)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    expected = fp8_attention_reference(*quantize_attention_inputs(q, k, v), 128**-0.5, causal, torch.float32)
    exact = _exact(q, k, v, causal)
    # The kernel rounds the probabilities against a running row max (block by block), the reference
    # against the whole row's, so the two round differently but by as much: on FLUX.1-dev's shape
    # (H200) the kernel was 5.95e-2 from exact attention, the reference 5.96e-2, bf16 2.3e-3.
    assert _rel(out, exact) < 1.25 * _rel(expected, exact)
    assert _rel(out, exact) < 0.08


@pytest.mark.gpu
def test_cudnn_fp8_attention_compiles_without_graph_breaks():
    _skip_unless_runnable()
    from diffserve.layers.attention import Attention, set_attention_backend

    layer = Attention(num_heads=8, head_size=128)
    set_attention_backend(layer, CudnnFp8AttentionBackend)
    q, k, v = _inputs((1, 512, 8, 128), device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    # Compiled code sums the key mean in another order, which re-rolls FP8's rounding: compiled and
    # eager differ by FP8's error itself (4.7e-2 on the H200), each as close to exact attention.
    assert _rel(compiled(q, k, v), _exact(q, k, v)) < 0.08


def test_head_sizes_the_kernel_does_not_take_use_sdpa(caplog):
    q, k, v = _inputs((1, 16, 2, 200))  # 200: not a multiple of 16 up to 128
    with caplog.at_level("WARNING", logger="diffserve"):
        out = CudnnFp8AttentionBackend.forward(q, k, v, None, 200**-0.5, False)
    torch.testing.assert_close(out, _exact(q, k, v), atol=1e-5, rtol=1e-5)
    assert "head size 200 is not a multiple of 16 up to 128; those layers use sdpa" in caplog.text
