"""Sequence parallelism with a key mask equals one process: Ulysses gathers the mask with the keys,
the ring hands each key/value shard's mask along and merges partials by LSE (a shard with no valid
key adds nothing), and the plan's hooks pad a text stream whose length does not divide by the degree
with masked positions.

A toy joint attention (text and image tokens, the text padded and masked per row) runs on 2 or 4 gloo
processes against the same module in this process. Measured max-abs differences (fp32, CPU,
2026-11-30): at most 1.0e-7 in every mode and text length; tolerance 1e-5. Qwen-Image itself is
covered by tests/distributed/test_parallel.py (its conformance cases pad prompts of unequal lengths).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from diffserve.distributed.ring_attention import merge_masked_partial
from diffserve.distributed.sp_plan import SequenceParallelInput, SequenceParallelOutput
from diffserve.layers.attention import Attention
from diffserve.layers.attention.backends import TorchSDPABackend

TOLERANCE = 1e-5
DIM, HEADS, IMAGE_TOKENS = 32, 4, 8


class ToyJointAttention(nn.Module):
    """Attention over [text; image] with a text key mask; returns the image tokens."""

    _sp_plan = {
        "": {
            "image": SequenceParallelInput(split_dim=1, expected_dims=3),
            "text": SequenceParallelInput(split_dim=1, expected_dims=3, pad=True),
            "text_mask": SequenceParallelInput(split_dim=1, expected_dims=2, mask_of="text"),
        },
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.attn = Attention(HEADS, DIM // HEADS)
        self.proj_out = nn.Linear(DIM, DIM)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None):
        q, k, v = (t.unflatten(-1, (HEADS, -1)) for t in self.qkv(torch.cat([text, image], dim=1)).chunk(3, -1))
        key_mask = None
        if text_mask is not None:
            image_mask = text_mask.new_ones(text_mask.shape[0], image.shape[1], dtype=torch.bool)
            key_mask = torch.cat([text_mask.bool(), image_mask], dim=1)
        out = self.attn(q, k, v, key_mask).flatten(2)
        return self.proj_out(out[:, text.shape[1] :])


class ToyPipeline(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = ToyJointAttention()


def toy_inputs(text_len: int, masked: bool):
    g = torch.Generator().manual_seed(text_len)
    image = torch.randn(2, IMAGE_TOKENS, DIM, generator=g)
    text = torch.randn(2, text_len, DIM, generator=g)
    mask = None
    if masked:
        mask = torch.ones(2, text_len, dtype=torch.long)
        mask[1, 2:] = 0  # row 1: two real tokens, the rest padding (whole shards of it fully masked)
    return image, text, mask


def _run_rank(rank, world_size, port, ulysses, ring, cases, out_path):
    from diffserve.config import DiffusionParallelConfig
    from diffserve.distributed.parallel_state import (
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from diffserve.distributed.sequence_parallel import apply_sequence_parallel

    init_distributed_environment(rank, world_size, "gloo", init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(DiffusionParallelConfig(ulysses_degree=ulysses, ring_degree=ring), "cpu")
    pipeline = ToyPipeline()
    apply_sequence_parallel(pipeline, None)
    outputs = []
    with torch.no_grad():
        for text_len, masked in cases:
            image, text, mask = toy_inputs(text_len, masked)
            outputs.append(pipeline.transformer(image, text, text_mask=mask))
    if rank == 0:
        torch.save(outputs, out_path)
    destroy_model_parallel()


CASES = [(8, True), (7, True), (7, False), (5, True), (8, False)]  # (text length, padded rows)
MODES = {"ulysses2": (2, 1), "ring2": (1, 2), "ulysses2xring2": (2, 2)}


@pytest.mark.parametrize("mode", list(MODES))
def test_masked_sequence_parallel_matches_single_process(tmp_path, mode):
    from diffserve.engine.multiproc_executor import get_free_port

    ulysses, ring = MODES[mode]
    out_path = str(tmp_path / "out.pt")
    mp.start_processes(_run_rank, args=(ulysses * ring, get_free_port(), ulysses, ring, CASES, out_path),
                       nprocs=ulysses * ring, start_method="spawn")
    actual = torch.load(out_path)
    model = ToyPipeline().transformer
    with torch.no_grad():
        for (text_len, masked), out in zip(CASES, actual):
            expected = model(*toy_inputs(text_len, masked))
            assert out.shape == expected.shape
            assert (out - expected).abs().max().item() <= TOLERANCE, (mode, text_len, masked)
    # The mask matters: unmasked padding would change the padded row.
    image, text, mask = toy_inputs(7, True)
    with torch.no_grad():
        assert (model(image, text, mask)[1] - model(image, text)[1]).abs().max() > 1e-2


def _qkv(seed=0, s_q=6, s_kv=12, heads=3, dim=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, s, heads, dim, generator=g) for s in (s_q, s_kv, s_kv))


def test_masked_forward_with_lse_equals_masked_attention():
    q, k, v = _qkv()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 5:] = False
    out, lse = TorchSDPABackend.forward_with_lse(q, k, v, 0.3, key_mask=mask)
    expected = TorchSDPABackend.forward(q, k, v, mask[:, None, None, :], 0.3, False)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    # Measured 0.0 (output) and 2.4e-7 (LSE), fp32 on CPU; tolerance 1e-5.
    assert (out - expected).abs().max() <= 1e-5
    assert (lse - scores.logsumexp(-1)).abs().max() <= 1e-5


def test_fully_masked_shards_add_nothing_to_the_merge():
    """Keys split in three; row 1's first two shards have no valid key (lse -inf, output 0), also
    before any shard with one was merged."""
    q, k, v = _qkv(seed=1)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :8] = False
    empty, _ = TorchSDPABackend.forward_with_lse(q, k[:, :4], v[:, :4], 0.3, key_mask=mask[:, :4])
    out = lse = None
    for part in (slice(0, 4), slice(4, 8), slice(8, 12)):
        partial = TorchSDPABackend.forward_with_lse(q, k[:, part], v[:, part], 0.3, key_mask=mask[:, part])
        out, lse = partial if out is None else merge_masked_partial(out, lse, *partial)
    expected = TorchSDPABackend.forward(q, k, v, mask[:, None, None, :], 0.3, False)
    assert torch.isneginf(TorchSDPABackend.forward_with_lse(q, k[:, :4], v[:, :4], 0.3, key_mask=mask[:, :4])[1][1]).all()
    assert empty[1].abs().max() == 0
    # Measured 3.6e-7; tolerance 1e-5.
    assert torch.isfinite(out).all() and (out - expected).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_masked_attention_with_lse_on_cuda(dtype, tolerance):
    """The CUDA path (memory-efficient kernel with an additive bias, odd lengths): output and LSE equal
    masked attention in float32, rows without a valid key give 0 and -inf, and merged key shards equal
    attention over all keys. Measured on an H200 (2026-11-30, torch 2.11): out 1.4e-6 / lse 2.1e-6
    (fp32), out 6.8e-3 / lse 1.2e-6 (bf16); see benchmarks/RESULTS.md."""
    q, k, v = (t.to("cuda", dtype) for t in _qkv(seed=2, s_q=70, s_kv=45, heads=3, dim=64))
    mask = torch.ones(2, 45, dtype=torch.bool, device="cuda")
    mask[1, 7:] = False
    out, lse = TorchSDPABackend.forward_with_lse(q, k, v, 0.125, key_mask=mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * 0.125
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
    assert (out.float() - expected).abs().max().item() <= tolerance
    assert (lse - scores.logsumexp(-1)).abs().max().item() <= tolerance
    empty = torch.zeros_like(mask)
    empty[0] = True
    out_empty, lse_empty = TorchSDPABackend.forward_with_lse(q, k, v, 0.125, key_mask=empty)
    assert torch.isneginf(lse_empty[1]).all() and out_empty[1].abs().max() == 0
    merged = merged_lse = None
    for part in (slice(0, 7), slice(7, 30), slice(30, 45)):  # row 1's last two shards are fully masked
        partial = TorchSDPABackend.forward_with_lse(q, k[:, part], v[:, part], 0.125, key_mask=mask[:, part])
        partial = (partial[0].float(), partial[1])
        merged, merged_lse = partial if merged is None else merge_masked_partial(merged, merged_lse, *partial)
    assert (merged - expected).abs().max().item() <= tolerance
