"""CPU offload on one GPU: peak GPU memory and time of no offload, model-level and layerwise offload,
for FLUX.1-dev 1024x1024 and Wan2.1-T2V-14B 832x480 (81 frames), real configs, random bf16 weights,
and whether the outputs are identical to no offload. One command, a few minutes on one H200:

    python benchmarks/bench_offload.py --json-out offload.json

Modes (--modes, `none` first): none, model, layerwise; none_chunked and layerwise_chunked
(ffn_chunk_size=--ffn-chunk-size: their latents are compared bit for bit with none_chunked, and
their max-abs distance from none is printed); layerwise_resident (layerwise_resident_blocks=
--resident-blocks, by default the fewest with which copying the streamed blocks takes at most
--resident-copy-ratio x the step time of none, from the measured bandwidth). For each layerwise mode
it prints the bytes copied per step and the bound they set (bytes / bandwidth); for every mode, the
bytes offload copied to the device per timed request.

No checkpoint is read or written: each model's folder holds only its configs (the real ones: the
FLUX.1-dev transformer, CLIP-L, T5-XXL and the FLUX VAE; the Wan2.1 14B transformer, UMT5-XXL and the
Wan2.1 VAE, vocabularies included) and the small test tokenizers, and the weights are drawn at load,
on the GPU, from seeds fixed per tensor, so every mode's engine gets the same ones. (In this process
only: the text encoders' and VAEs' `from_pretrained` build from the config, and the loader fills the
transformer instead of streaming files.) 2-D weights ~ N(0, 1/fan_in); norm scales 1 + N(0, 0.05^2),
biases N(0, 0.02^2).

Per model and mode, in a fresh engine (eager unless --compile): a warm-up request (kernels, allocator;
its decode also makes model-level offload copy the encoders for the next request, as in steady
serving), then timed requests (back to back, or each after --idle-s seconds of idle device).
Reported: per-step time (denoise stage / steps), end-to-end time, the request's and the denoise
stage's peak GPU memory (torch.cuda.max_memory_allocated: tensors, not the allocator's reserve), the
transformer's weight bytes, and whether the final latents of the timed request (what the VAE decodes)
are bit-identical to no offload. Printed against the targets:
- layerwise: denoise-stage peak <= 30% of the transformer's weight bytes, at <= 1.3x the step time;
- model-level: <= 1.05x the end-to-end time. Model-level offload copies each transformer during its
  first call of the request (each block waits for its own copy), so its cost is paid once per request,
  inside the first step: the ratio depends on the step count. It is printed as measured and projected
  to the model's default steps (28 for FLUX.1-dev, 50 for Wan): each mode's measured time plus the
  missing steps at its steady step time (from the second transformer call on, timed with CUDA events;
  it needs --flux-steps/--wan-steps >= 3). `--flux-steps 28` measures FLUX's ratio directly.
Layerwise copies every block once per transformer call, so a step takes at least the transformer's
bytes over the host-to-device bandwidth (measured and printed as a bound).

On a CPU, `--tiny --device cpu` runs the same script on the tiny test configs in seconds (a smoke
test: it measures nothing about offload).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
import zlib

import torch

from bench_flux_transformer import default_dtype

GIB = 1024**3
# mode -> engine options; "chunked" modes add ffn_chunk_size=--ffn-chunk-size, and "layerwise_resident"
# layerwise_resident_blocks=--resident-blocks (auto: see resident_blocks_for).
MODES = {
    "none": {},
    "none_chunked": {"chunked": True},
    "model": {"enable_cpu_offload": True},
    "layerwise": {"enable_layerwise_offload": True},
    "layerwise_chunked": {"enable_layerwise_offload": True, "chunked": True},
    "layerwise_resident": {"enable_layerwise_offload": True, "resident": True},
}
TARGETS = {"layerwise_peak_share": 0.30, "layerwise_step_ratio": 1.3, "model_e2e_ratio": 1.05}

# -- real configs (diffusers / transformers config.json values) ---------------------------------------

T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
              is_gated_act=True, tie_word_embeddings=False, dropout_rate=0.0)
FLUX_DEV = {
    # black-forest-labs/FLUX.1-dev
    "transformer": dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                        num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
                        pooled_projection_dim=768, axes_dims_rope=[16, 56, 56], out_channels=None),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                         hidden_act="quick_gelu", attention_dropout=0.0, dropout=0.0),
    "text_encoder_2": dict(T5_XXL, vocab_size=32128),
    "vae": dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=16, norm_num_groups=32,
                sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, in_channels=3, out_channels=3),
}
WAN_14B = {
    # Wan-AI/Wan2.1-T2V-14B-Diffusers
    "transformer": dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                        added_kv_proj_dim=None, rope_max_seq_len=1024),
    "text_encoder": dict(T5_XXL, vocab_size=256384),  # UMT5-XXL
    "vae": "AutoencoderKLWan",  # the class defaults are the Wan2.1 VAE
}


def _class_defaults(class_name: str) -> dict:
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name)()
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def write_config_folder(tiny_arch: str, path: str, configs: dict | None) -> str:
    """The tiny checkpoint's layout (tokenizers, scheduler, model_index.json) with `configs` merged into
    the components' config.json (None: the tiny configs) and no weight files."""
    from diffserve.testing import make_tiny_checkpoint

    shutil.rmtree(path, ignore_errors=True)
    make_tiny_checkpoint(tiny_arch, path)
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith((".safetensors", ".bin")):
                os.remove(os.path.join(root, name))
    _edit_json(os.path.join(path, "model_index.json"), lambda index: index.pop("_diffserve_defaults", None))
    for component, values in (configs or {}).items():
        values = _class_defaults(values) if isinstance(values, str) else values
        _edit_json(os.path.join(path, component, "config.json"), lambda config, v=values: config.update(v))
    return path


def _edit_json(file: str, edit) -> None:
    with open(file) as f:
        data = json.load(f)
    edit(data)
    with open(file, "w") as f:
        json.dump(data, f, indent=2)


# -- random weights at load ---------------------------------------------------------------------------


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _random_like(name: str, shape, device: torch.device) -> torch.Tensor:
    """A float32 tensor for the parameter `name`, the same on every call."""
    generator = torch.Generator(device).manual_seed(_seed(name))
    values = torch.randn(shape, generator=generator, device=device)
    if len(shape) >= 2:
        return values / (torch.Size(shape)[1:].numel() ** 0.5)
    return 1 + 0.05 * values if name.endswith("weight") else 0.02 * values


def install_random_weights(device: torch.device) -> None:
    """Make this process build every component from its config with random weights drawn on `device`."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    from diffserve.loader import DiffusersPipelineLoader

    def from_pretrained(cls, path, *args, subfolder=None, dtype=None, torch_dtype=None, **kwargs):
        folder = os.path.join(path, subfolder) if subfolder else path
        if issubclass(cls, PreTrainedModel):
            config = cls.config_class.from_pretrained(folder)
            build = lambda: cls(config)  # noqa: E731
        else:
            build = lambda: cls.from_config(cls.load_config(folder))  # noqa: E731
        torch.manual_seed(_seed(subfolder or path))
        # Built on the device in its dtype (never billions of float32 parameters on the host), then
        # handed to the pipeline on the host, as from_pretrained does.
        with torch.device(device), default_dtype(dtype or torch_dtype or torch.float32), torch.no_grad():
            module = build()
            for name, p in module.named_parameters():
                if p.dim() == 1:  # no norm or bias trivially 1 or 0
                    p.copy_(_random_like(f"{subfolder}.{name}", p.shape, device))
        return module.to("cpu").eval()

    def load_weights(self, pipeline) -> set[str]:
        prefixes = tuple(source.prefix for source in pipeline.weights_sources)
        buffers = [n for n, _ in pipeline.named_buffers() if n.startswith(prefixes)]
        if buffers:
            raise ValueError(f"the random fill knows parameters only; {buffers[:3]} would stay uninitialized")
        loaded = set()
        with torch.no_grad():
            for name, param in pipeline.named_parameters():
                if name.startswith(prefixes):
                    param.copy_(_random_like(name, param.shape, device).to(param.dtype))
                    loaded.add(name)
        return loaded

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    ModelMixin.from_pretrained = classmethod(from_pretrained)
    DiffusersPipelineLoader.load_weights = load_weights


# -- measurement -------------------------------------------------------------------------------------


def host_to_device_gib_s(device: torch.device) -> float | None:
    """Pinned host-to-device copy bandwidth (1 GiB)."""
    if device.type != "cuda":
        return None
    host = torch.empty(GIB, dtype=torch.uint8).pin_memory()
    target = torch.empty(GIB, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return 3 / (time.perf_counter() - start)


def capture_latents(pipeline) -> list[torch.Tensor]:
    """Every latent tensor the pipeline's VAE decodes, on the host (the outermost wrapper of decode)."""
    seen = []
    decode = pipeline.vae.decode

    def capturing(z, *args, **kwargs):
        seen.append(z.detach().to("cpu", copy=True).contiguous())
        return decode(z, *args, **kwargs)

    pipeline.vae.decode = capturing
    return seen


class CallClock:
    """When each denoiser call of a request starts (CUDA events on the compute stream, read after the
    request: no sync), for the step time once the first call is past. Model-level offload copies a
    denoiser during its first call of the request, so that call is longer than the others."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self, module, args) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def steady_step_s(self, steps: int) -> float | None:
        """The mean time per step from the second call's start to the last call's (None: fewer than 3
        calls, too few to leave the first one out)."""
        if len(self.marks) < 3:
            return None
        first, last = self.marks[1], self.marks[-1]
        seconds = first.elapsed_time(last) / 1000 if self.cuda else last - first
        return seconds / (len(self.marks) - 2) * (len(self.marks) / steps)


def count_copied_bytes(offloader) -> list[int]:
    """The bytes of each weight set offload copies to the device from now on (nothing without offload)."""
    copied: list[int] = []
    if offloader is not None:
        def trace(action: str, name: str) -> None:
            if action == "load":
                copied.append(offloader.sets[name].nbytes)

        offloader.transfers.trace = trace
    return copied


def engine_options(mode: str, ffn_chunk_size: int, resident_blocks: int) -> dict:
    options = {k: v for k, v in MODES[mode].items() if k not in ("chunked", "resident")}
    if MODES[mode].get("chunked"):
        options["ffn_chunk_size"] = ffn_chunk_size
    if MODES[mode].get("resident"):
        options["layerwise_resident_blocks"] = resident_blocks
    return options


def block_bytes(pipeline) -> list[list[int]]:
    """Per denoiser, the bytes of each block in call order (as layerwise offload streams them)."""
    from diffserve.offload.plan import plan_offload, total_bytes

    return [[total_bytes(b.tensors) for b in d.blocks] for d in plan_offload(pipeline).denoisers]


def resident_blocks_for(blocks: list[list[int]], step_s: float, bandwidth: float | None, copy_ratio: float) -> int:
    """The fewest resident blocks (per denoiser) with which copying the streamed ones takes at most
    `copy_ratio` x the step time without offload: the copies then hide behind the compute, if the
    resident blocks between the streamed ones are compute enough. Without a bandwidth (no GPU): half."""
    from diffserve.offload.layerwise import resident_block_indices

    count = max(len(b) for b in blocks)
    if bandwidth is None:
        return count // 2
    for n in range(count):
        kept = [set(resident_block_indices(len(b), n)) for b in blocks]
        streamed = max(sum(size for i, size in enumerate(b) if i not in k) for b, k in zip(blocks, kept))
        if streamed / GIB / bandwidth <= copy_ratio * step_s:
            return n
    return count - 1


def measure_mode(path: str, mode: str, engine: dict, setup: dict) -> dict:
    from diffserve import Omni, OmniDiffusionSamplingParams
    from diffserve.models.interface import discover_components

    steps = setup["steps"]
    start = time.perf_counter()
    with Omni(path, disable_progress_bar=True, **engine) as omni:
        load_s = time.perf_counter() - start
        worker = omni.engine.executor.worker
        dit_bytes = sum(worker.dit_param_bytes().values())
        blocks = block_bytes(worker.pipeline) if mode == "none" else None
        latents = capture_latents(worker.pipeline)
        omni.generate(setup["prompt"], OmniDiffusionSamplingParams(**setup["warmup"]))
        copied = count_copied_bytes(worker.offloader)
        clocks = []
        for dit in discover_components(worker.pipeline)["dit"].values():
            dit.register_forward_pre_hook(lambda module, args: clocks[-1].mark(module, args))
        runs = []
        for _ in range(setup["repeats"]):
            # An idle device before the request (a lightly loaded server): model-level offload's copy of
            # the encoders, started during the previous decode, is done by then. 0: back to back.
            time.sleep(setup["idle_s"])
            clocks.append(CallClock(worker.device))
            params = OmniDiffusionSamplingParams(num_inference_steps=steps, **setup["params"])
            metrics = omni.generate(setup["prompt"], params)[0].metrics
            runs.append(metrics | {"steady_step_s": clocks[-1].steady_step_s(steps)})
        calls = [mark for clock in clocks for mark in clock.marks]
        final = latents[-1]
        offloader = worker.offloader
        streamed = sum(offloader.streamed_bytes_per_call.values()) if offloader is not None else 0
    median = sorted(runs, key=lambda m: m["e2e_s"])[len(runs) // 2]
    return {
        "mode": mode,
        "options": {k: v for k, v in engine.items()
                    if k in ("ffn_chunk_size", "layerwise_resident_blocks", "layerwise_prefetch")},
        # What layerwise offload copies to the device per denoise step: its streamed blocks, once per
        # transformer call (one per step with the CFG branches batched).
        "streamed_gib_per_step": streamed * len(calls) / (steps * len(runs)) / GIB,
        # Everything offload copied to the device per timed request (encoders and VAEs included).
        "copied_gib_per_request": sum(copied) / len(runs) / GIB,
        "blocks": blocks,
        "load_s": load_s,
        "step_s": sorted(m["denoise_s"] for m in runs)[len(runs) // 2] / steps,
        # The time per step after the first call (None below 3 steps): what projecting to more steps adds.
        "steady_step_s": median["steady_step_s"],
        "e2e_s": median["e2e_s"],
        "encode_s": median["encode_s"],
        "decode_s": median.get("decode_s"),
        "peak_gib": median.get("peak_gpu_bytes", 0) / GIB,
        "denoise_peak_gib": median.get("denoise_peak_gpu_bytes", 0) / GIB,
        "dit_gib": dit_bytes / GIB,
        "latents": final,
    }


def reference_mode(mode: str, modes: list[str]) -> str:
    """The mode whose latents `mode` must equal bit for bit: no offload with the same chunking."""
    return "none_chunked" if MODES[mode].get("chunked") and "none_chunked" in modes else "none"


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.shape != b.shape:
        return None
    return (a.float() - b.float()).abs().nan_to_num(float("inf")).max().item()


def projected_e2e_s(result: dict, steps: int, default_steps: int) -> float:
    """The request's time at `default_steps`: as measured, plus the missing steps at the mode's steady step
    time. Model-level offload pays its copy inside the first call, once per request, so the steps after
    it are what more steps add; layerwise pays per step, and its steady step says so too. (Below 3
    steps there is no steady step to read: the mean step time, which counts the first call.)"""
    step = result["steady_step_s"] if result["steady_step_s"] is not None else result["step_s"]
    return result["e2e_s"] + (default_steps - steps) * step


def compare(results: list[dict], steps: int, default_steps: int) -> list[dict]:
    """Ratios against the first mode (no offload), the e2e ratio projected to `default_steps`, and
    bit-identity of the final latents with the reference mode (no offload, with the same chunking)."""
    base = results[0]
    base_e2e_default = projected_e2e_s(base, steps, default_steps)
    by_mode = {r["mode"]: r for r in results}
    rows = []
    for r in results:
        reference = by_mode[reference_mode(r["mode"], list(by_mode))]
        same_shape = r["latents"].shape == reference["latents"].shape
        identical = same_shape and torch.equal(r["latents"].view(torch.uint8), reference["latents"].view(torch.uint8))
        rows.append({k: v for k, v in r.items() if k not in ("latents", "blocks")} | {
            "step_ratio": r["step_s"] / base["step_s"],
            "e2e_ratio": r["e2e_s"] / base["e2e_s"],
            f"e2e_ratio_at_{default_steps}_steps": projected_e2e_s(r, steps, default_steps) / base_e2e_default,
            "denoise_peak_share_of_dit": r["denoise_peak_gib"] / r["dit_gib"],
            "reference": reference["mode"],
            "identical": identical,
            # Chunking changes matmul rounding only: how far from the unchunked model without offload.
            "max_abs_vs_none": _max_abs(r["latents"], base["latents"]),
            "finite": bool(torch.isfinite(r["latents"].float()).all()),
        })
    return rows


def verdicts(rows: list[dict], default_steps: int) -> list[str]:
    by_mode = {row["mode"]: row for row in rows}
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    lines = []
    for row in rows:
        if not row["mode"].startswith("layerwise"):
            continue
        share, ratio = row["denoise_peak_share_of_dit"], row["step_ratio"]
        options = "".join(f", {k}={v}" for k, v in row["options"].items())
        lines.append(f"{row['mode']}{options}: denoise peak {share:.0%} of the transformer's weight bytes (target <= "
                     f"{TARGETS['layerwise_peak_share']:.0%}: {met(share <= TARGETS['layerwise_peak_share'])}), "
                     f"step time {ratio:.2f}x (target <= {TARGETS['layerwise_step_ratio']}x: "
                     f"{met(ratio <= TARGETS['layerwise_step_ratio'])})")
    if "model" in by_mode:
        row = by_mode["model"]
        ratio, projected = row["e2e_ratio"], row[f"e2e_ratio_at_{default_steps}_steps"]
        lines.append(f"model-level: end-to-end {ratio:.3f}x as measured, {projected:.3f}x projected to "
                     f"{default_steps} steps (target <= {TARGETS['model_e2e_ratio']}x: "
                     f"{met(projected <= TARGETS['model_e2e_ratio'])})")
    for row in rows[1:]:
        same = "bit-identical to" if row["identical"] else "DIFFERENT from"
        lines.append(f"{row['mode']}: latents {same} {row['reference']}; max-abs vs none (unchunked): "
                     f"{row['max_abs_vs_none']}")
    return lines


def report(title: str, rows: list[dict], default_steps: int, bandwidth: float | None, on_gpu: bool) -> list[str]:
    print(f"\n**{title}**\n")
    print(f"| mode | options | per-step s | step vs none | e2e s | e2e vs none | e2e vs none at {default_steps} steps | "
          "peak GiB | denoise peak GiB | denoise peak / DiT bytes | copied GiB / step | copied GiB / request | "
          "latents identical to | max-abs vs none | load s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        same = f"{r['reference']}: {'yes' if r['identical'] else 'NO'}"
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        print(f"| {r['mode']} | {options} | {r['step_s']:.3f} | {r['step_ratio']:.2f}x | {r['e2e_s']:.2f} | "
              f"{r['e2e_ratio']:.3f}x | {r[f'e2e_ratio_at_{default_steps}_steps']:.3f}x | {r['peak_gib']:.2f} | "
              f"{r['denoise_peak_gib']:.2f} | {r['denoise_peak_share_of_dit']:.0%} | {r['streamed_gib_per_step']:.2f} | "
              f"{r['copied_gib_per_request']:.2f} | {same} | {r['max_abs_vs_none']} | {r['load_s']:.0f} |")
    lines = verdicts(rows, default_steps) if on_gpu else ["(no GPU: no memory figures and no verdicts)"]
    if bandwidth:
        for r in rows:
            if r["streamed_gib_per_step"]:
                lines.append(f"bound, {r['mode']}: {r['streamed_gib_per_step']:.1f} GiB copied per step over "
                             f"{bandwidth:.1f} GiB/s host-to-device = {r['streamed_gib_per_step'] / bandwidth:.3f} s "
                             f"per step (no offload: {rows[0]['step_s']:.3f} s)")
    if not all(r["finite"] for r in rows):
        lines.append("WARNING: non-finite latents (random weights); identity is compared bit for bit all the same")
    print()
    for line in lines:
        print(line)
    print(flush=True)
    return lines


def model_setups(args) -> dict:
    tiny = args.tiny
    flux_size = 64 if tiny else 1024
    wan = dict(height=32, width=32, num_frames=5) if tiny else dict(height=480, width=832, num_frames=81)
    text = 16 if tiny else 512
    return {
        "flux": dict(
            title=f"FLUX.1-dev {flux_size}x{flux_size}, guidance 3.5, {args.flux_steps} steps",
            tiny="flux", configs=None if tiny else FLUX_DEV, default_steps=28, repeats=args.repeats,
            prompt={"prompt": "a red fox in the snow, detailed fur", "seed": 0},
            warmup=dict(num_inference_steps=1, height=flux_size, width=flux_size, max_sequence_length=text),
            params=dict(height=flux_size, width=flux_size, guidance_scale=3.5, max_sequence_length=text),
            steps=args.flux_steps,
        ),
        "wan": dict(
            title=f"Wan2.1-T2V-14B {wan['width']}x{wan['height']}, {wan['num_frames']} frames, CFG 5.0, "
                  f"{args.wan_steps} steps",
            tiny="wan2.1-t2v", configs=None if tiny else WAN_14B, default_steps=50, repeats=1,
            prompt={"prompt": "a red fox running through snow, cinematic", "negative_prompt": "blurry, static",
                    "seed": 0},
            # Eager: a short clip (the kernels, the allocator, a decode). Compiled: the timed clip
            # itself, so the timed request does not pay for compiling its shapes.
            warmup=dict(num_inference_steps=1, height=wan["height"], width=wan["width"],
                        num_frames=wan["num_frames"] if args.compile else 5, max_sequence_length=text),
            params=dict(wan, guidance_scale=5.0, max_sequence_length=text),
            steps=args.wan_steps,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="flux,wan")
    parser.add_argument("--modes", default="none,model,layerwise",
                        help=f"some of {', '.join(MODES)}; none must come first (the baseline)")
    parser.add_argument("--ffn-chunk-size", type=int, default=4096, help="ffn_chunk_size of the *_chunked modes")
    parser.add_argument("--resident-blocks", default="auto",
                        help="layerwise_resident_blocks of layerwise_resident: a number, or auto (the fewest with "
                             "which the copies take at most --resident-copy-ratio x the step without offload)")
    parser.add_argument("--resident-copy-ratio", type=float, default=1.1)
    parser.add_argument("--layerwise-prefetch", type=int, default=1, help="layerwise_prefetch of the layerwise modes")
    parser.add_argument("--flux-steps", type=int, default=4)
    parser.add_argument("--wan-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed FLUX requests per mode (Wan: one)")
    parser.add_argument("--idle-s", type=float, default=0.0,
                        help="seconds the device idles before each timed request (default 0: back to back)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile (minutes more per mode)")
    parser.add_argument("--dir", default="/tmp/bench_offload", help="where the config folders go")
    parser.add_argument("--tiny", action="store_true", help="the tiny test configs (a smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "none" or not set(modes) <= set(MODES):
        parser.error(f"--modes: some of {', '.join(MODES)}, starting with none (the baseline)")
    if args.resident_blocks != "auto" and not args.resident_blocks.isdigit():
        parser.error(f"--resident-blocks: a number or auto, got {args.resident_blocks!r}")

    device = torch.device(args.device)
    install_random_weights(device)
    bandwidth = host_to_device_gib_s(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    engine = {"dtype": "float32" if args.tiny else "bfloat16", "device": args.device,
              "enforce_eager": not args.compile}
    out = {"device": name, "torch": torch.__version__, "args": vars(args), "targets": TARGETS,
           "host_to_device_gib_s": bandwidth, "models": {}}
    setups = model_setups(args)
    for setup in setups.values():
        setup["idle_s"] = args.idle_s
    for model in args.models.split(","):
        setup = setups[model]
        path = write_config_folder(setup["tiny"], os.path.join(args.dir, model), setup["configs"])
        results = []
        for mode in modes:
            resident = (int(args.resident_blocks) if args.resident_blocks != "auto" else
                        resident_blocks_for(results[0]["blocks"], results[0]["step_s"], bandwidth,
                                            args.resident_copy_ratio) if results else 0)
            options = engine | engine_options(mode, args.ffn_chunk_size, resident)
            if mode.startswith("layerwise") and args.layerwise_prefetch != 1:
                options["layerwise_prefetch"] = args.layerwise_prefetch
            result = measure_mode(path, mode, options, setup)
            print(f"{model} {mode}: step {result['step_s']:.3f} s, e2e {result['e2e_s']:.2f} s, peak "
                  f"{result['peak_gib']:.2f} GiB (denoise {result['denoise_peak_gib']:.2f}), load {result['load_s']:.0f} s",
                  flush=True)
            results.append(result)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows = compare(results, setup["steps"], setup["default_steps"])
        title = f"{setup['title']}, {'regional torch.compile' if args.compile else 'eager'}, {engine['dtype']}, {name}"
        lines = report(title, rows, setup["default_steps"], bandwidth, device.type == "cuda")
        out["models"][model] = {"title": title, "rows": rows, "verdicts": lines}
        shutil.rmtree(path, ignore_errors=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
