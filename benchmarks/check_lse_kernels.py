"""Checks the attention-with-LSE kernels ring attention uses, against fp64 math, on this machine.

    python benchmarks/check_lse_kernels.py

For each CUDA path (cuDNN, flash, memory-efficient) and a Wan- and a FLUX-like shape it prints the
max-abs error of the output and of the log-sum-exp, and times the kernel against plain SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.layers.attention.backends import sdpa


def reference(q, k, v, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(scores, -1) @ v.double(), scores.logsumexp(-1)


def timed(fn, repeats=10):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| shape [B, H, S_q, S_kv, D] | path | out max err | lse max err | ms | SDPA ms |")
    print("|---|---|---:|---:|---:|---:|")
    for b, h, sq, skv, d in [(2, 40, 8190, 8190, 128), (2, 24, 1152, 1152, 128)]:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for s in (sq, skv, skv))
        scale = d**-0.5
        ref_out, ref_lse = (reference(q[:1, :4], k[:1, :4], v[:1, :4], scale))
        sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        for name, cudnn in (("cudnn", True), ("flash", False)):
            sdpa._cudnn_usable = cudnn
            out, lse = sdpa._cuda_attention_with_lse(q, k, v, scale)
            ms = timed(lambda: sdpa._cuda_attention_with_lse(q, k, v, scale))
            out_err = (out[:1, :4].double() - ref_out).abs().max().item()
            lse_err = (lse[:1, :4].double() - ref_lse).abs().max().item()
            print(f"| {[b, h, sq, skv, d]} | {name if sdpa._cudnn_usable or not cudnn else 'cudnn->flash'} | "
                  f"{out_err:.2e} | {lse_err:.2e} | {ms:.2f} | {sdpa_ms:.2f} |", flush=True)
        sdpa._cudnn_usable = True


if __name__ == "__main__":
    main()
