"""FP8 attention through cuDNN's fused FP8 SDPA (Hopper and newer), called via `nvidia-cudnn-frontend`.

Lossy and opt-in (`attention_backend="cudnn_fp8"`). q, k and v are each quantized to float8 e4m3 with
one scale per tensor (dynamic: from the tensor's own max, computed on the GPU without a host sync);
the kernel multiplies the descales back in, rounds the softmax probabilities to FP8 for the second
matmul and writes the output in FP8 too (on Hopper cuDNN writes an FP8 attention's output only in
FP8), scaled by v's max, which bounds it: each output row is a convex combination of v's rows. Keys
are centred over the sequence first: that leaves softmax unchanged (it adds one constant to each
query's scores) and shrinks the values FP8 has to round.

`fp8_attention_reference` states the arithmetic in plain torch, for CPU tests and for the GPU test
that holds the kernel to it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading

import torch

from diffserve.layers.attention.backends.abstract import AttentionBackend, needs_cuda_16bit
from diffserve.layers.attention.backends.sdpa import TorchSDPABackend

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# The softmax probabilities (in [0, 1] before normalisation) are scaled by this before the FP8 cast.
PROBABILITY_SCALE = FP8_MAX


def quantize_fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in float8 e4m3 scaled so that its largest magnitude maps to FP8's largest, and the float32
    descale [1, 1, 1, 1] that multiplies it back."""
    amax = x.abs().amax().float().clamp(min=1e-12).reshape(1, 1, 1, 1)
    q = (x.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, amax / FP8_MAX


def quantize_attention_inputs(query, key, value):
    """[B, S, H, D] q, k, v -> (q8, k8, v8, descale_q, descale_k, descale_v). Keys are centred over
    the sequence, per head and channel: softmax is invariant to it, and FP8 rounds smaller values."""
    key = key - key.float().mean(dim=1, keepdim=True).to(key.dtype)
    (q8, dq), (k8, dk), (v8, dv) = (quantize_fp8_per_tensor(t) for t in (query, key, value))
    return q8, k8, v8, dq, dk, dv


def fp8_attention_reference(q8, k8, v8, descale_q, descale_k, descale_v, scale: float, causal: bool, out_dtype):
    """What the kernel computes, in float32: scores from the dequantized q and k; the softmax's
    unnormalised probabilities exp(s - rowmax), rounded to FP8 after scaling by PROBABILITY_SCALE,
    times the dequantized v; normalised by the unrounded row sum; rounded to FP8 at v's scale. Inputs
    and output are [B, S, H, D]."""
    q, k, v = (t.float().transpose(1, 2) * d for t, d in ((q8, descale_q), (k8, descale_k), (v8, descale_v)))
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    p8 = (p * PROBABILITY_SCALE).to(FP8).float() / PROBABILITY_SCALE
    out = (p8 @ v) / p.sum(dim=-1, keepdim=True)
    out = (out / descale_v).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * descale_v  # written in FP8, v's scale
    return out.transpose(1, 2).to(out_dtype)


# --- the cuDNN graph ---------------------------------------------------------------------------

_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")


def _bhsd(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """cuDNN's [B, H, S, D] dims and strides of a [B, S, H, D] tensor (no copy)."""
    b, s, h, d = t.shape
    sb, ss, sh, sd = t.stride()
    return [b, h, s, d], [sb, sh, ss, sd]


class _Fp8SdpaGraph:
    """One built cuDNN FP8 SDPA graph (for one set of shapes and strides) and what each call reuses.

    A call costs the GPU a fraction of a millisecond, so its host side is kept to a pointer table and
    one execute: the constant scales and the unread amax outputs are allocated once.
    """

    _handles: dict[int, list] = {}  # device index -> [cuDNN handle, the stream it was last set to]

    def __init__(self, q8, k8, v8, out, scale: float, causal: bool):
        import cudnn

        device = q8.device
        self.handle_state = self._handles.setdefault(device.index, [cudnn.create_handle(), None])
        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle_state[0])
        tensors = {}
        for name, t in (("q", q8), ("k", k8), ("v", v8)):
            dim, stride = _bhsd(t)
            tensors[name] = graph.tensor(name=name, dim=dim, stride=stride, data_type=cudnn.data_type.FP8_E4M3)
        for name in _SCALARS:
            tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                                         data_type=cudnn.data_type.FLOAT)
        o, _stats, amax_s, amax_o = graph.sdpa_fp8(
            q=tensors["q"], k=tensors["k"], v=tensors["v"], **{name: tensors[name] for name in _SCALARS},
            generate_stats=False, attn_scale=scale, use_causal_mask=causal, name="sdpa_fp8",
        )
        dim, stride = _bhsd(out)
        # On Hopper cuDNN writes an FP8 attention's output only in FP8.
        o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(cudnn.data_type.FP8_E4M3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        tensors.update(o=o, amax_s=amax_s, amax_o=amax_o)
        self.graph = graph
        self.uids = {name: t.get_uid() for name, t in tensors.items()}
        self.workspace_size = graph.get_workspace_size()
        constants = torch.tensor([1 / PROBABILITY_SCALE, PROBABILITY_SCALE, 0.0, 0.0], device=device)
        self.constants = constants  # descale_s, scale_s, and the two amax outputs nobody reads
        self.fixed = {self.uids[name]: constants[i:].data_ptr()
                      for i, name in enumerate(("descale_s", "scale_s", "amax_s", "amax_o"))}

    def __call__(self, q8, k8, v8, descale_q, descale_k, descale_v, scale_o, out) -> None:
        import cudnn

        handle, last_stream = self.handle_state
        stream = torch.cuda.current_stream(q8.device).cuda_stream
        if stream != last_stream:
            cudnn.set_stream(handle=handle, stream=stream)
            self.handle_state[1] = stream
        workspace = torch.empty(self.workspace_size, dtype=torch.uint8, device=q8.device)
        u = self.uids
        pointers = {u["q"]: q8.data_ptr(), u["k"]: k8.data_ptr(), u["v"]: v8.data_ptr(),
                    u["descale_q"]: descale_q.data_ptr(), u["descale_k"]: descale_k.data_ptr(),
                    u["descale_v"]: descale_v.data_ptr(), u["scale_o"]: scale_o.data_ptr(), u["o"]: out.data_ptr(),
                    **self.fixed}
        self.graph.execute(pointers, workspace.data_ptr(), handle=handle)


_graphs: dict[tuple, _Fp8SdpaGraph] = {}
_lock = threading.Lock()


def cudnn_fp8_attention_kernel(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, scale: float,
                               causal: bool) -> torch.Tensor:
    """cuDNN's FP8 SDPA on [B, S, H, D] float8 e4m3 inputs (float32 [1, 1, 1, 1] descales); the output
    [B, S, H, D] in float8 e4m3, multiplied by `scale_o` before rounding."""
    out = torch.empty(q8.shape[:-1] + v8.shape[-1:], dtype=FP8, device=q8.device)
    key = (q8.shape, q8.stride(), k8.shape, k8.stride(), v8.shape, v8.stride(), scale, causal, q8.device.index)
    graph = _graphs.get(key)
    if graph is None:
        with _lock:
            graph = _graphs.get(key) or _Fp8SdpaGraph(q8, k8, v8, out, scale, causal)
            _graphs[key] = graph
    graph(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, out)
    return out


@torch.library.custom_op("diffserve::cudnn_fp8_attention", mutates_args=())
def _cudnn_fp8_attention_op(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                            descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor, scale: float,
                            causal: bool) -> torch.Tensor:
    return cudnn_fp8_attention_kernel(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, scale, causal)


@_cudnn_fp8_attention_op.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, scale, causal):
    return q8.new_empty(q8.shape[:-1] + v8.shape[-1:])


def _kernel_takes(query: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether cuDNN's FP8 kernel takes these head sizes on every GPU it runs on (Hopper: multiples of 16
    up to 128); other layers of the model keep bf16 attention, said once."""
    fits = all(d % 16 == 0 and d <= 128 for d in (query.shape[-1], value.shape[-1]))
    if not fits and not _kernel_takes.warned:
        _kernel_takes.warned = True
        logger.warning("cudnn_fp8: head size %d is not a multiple of 16 up to 128; those layers use sdpa",
                       query.shape[-1])
    return fits


_kernel_takes.warned = False


class CudnnFp8AttentionBackend(AttentionBackend):
    """FP8 attention (cuDNN's fused kernel); lossy, so opt-in only."""

    name = "cudnn_fp8"
    supports_mask = False

    @classmethod
    def unavailable_reason(cls, device, dtype):
        if reason := needs_cuda_16bit(device, dtype):
            return reason
        if torch.cuda.get_device_capability(device) < (9, 0):
            return f"needs compute capability 9.0+ (Hopper, Blackwell), {torch.cuda.get_device_name(device)} is not"
        if importlib.util.find_spec("cudnn") is None:
            return "nvidia-cudnn-frontend is not installed (pip install 'diffserve[fp8-attention]')"
        return None

    @staticmethod
    def forward(query, key, value, attn_mask, scale, causal):
        if not _kernel_takes(query, value):
            return TorchSDPABackend.forward(query, key, value, attn_mask, scale, causal)
        q8, k8, v8, dq, dk, dv = quantize_attention_inputs(query, key, value)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        # The output is a convex combination of v's rows, so v's scale keeps it in FP8's range.
        out = _cudnn_fp8_attention_op(q8, k8, v8, dq, dk, dv, 1 / dv, float(scale), bool(causal))
        return (out.float() * dv).to(query.dtype)  # under torch.compile, fused into what reads it
