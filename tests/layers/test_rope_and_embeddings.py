"""Shared layers against the diffusers functions they replace."""

import torch
from diffusers.models.embeddings import apply_rotary_emb as ref_apply_rotary_emb
from diffusers.models.embeddings import get_1d_rotary_pos_embed, get_timestep_embedding

from diffserve.layers.embeddings import timestep_embedding
from diffserve.layers.rope import apply_rotary_emb, rope_cos_sin


def test_rope_tables_match_diffusers():
    pos = torch.arange(0, 300, 3).float()
    for interleaved in (True, False):
        ours = rope_cos_sin(16, pos, theta=10000.0, interleaved=interleaved)
        ref = get_1d_rotary_pos_embed(
            16, pos, theta=10000.0, use_real=True, repeat_interleave_real=interleaved, freqs_dtype=torch.float64
        )
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_apply_rotary_emb_matches_diffusers():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 16)
    cos, sin = rope_cos_sin(16, torch.arange(10).float())
    ref = ref_apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin), ref, rtol=0, atol=0)
    cos2, sin2 = rope_cos_sin(16, torch.arange(10).float(), interleaved=False)
    ref2 = ref_apply_rotary_emb(x, (cos2, sin2), sequence_dim=1, use_real_unbind_dim=-2)
    torch.testing.assert_close(apply_rotary_emb(x, cos2, sin2, interleaved=False), ref2, rtol=0, atol=0)


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0.0, 1.5, 500.0, 999.0])
    for flip, shift, dim in ((True, 0, 256), (False, 1, 33)):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(timestep_embedding(t, dim, flip, shift), ref, rtol=0, atol=1e-6)
