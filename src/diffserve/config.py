"""Typed engine configuration.

Every knob is a dataclass field with a type and a default. Unknown keys are an error that names them
and lists the allowed ones: a typo must never be silently ignored. Environment variables are read
here, once, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a dtype or device is needed, so the CLI starts without it
    import torch

# Environment variables, read once at import. Each has a config field that takes precedence.
ENV_ATTENTION_BACKEND = os.environ.get("DIFFSERVE_ATTENTION_BACKEND") or None
ENV_LOG_LEVEL = os.environ.get("DIFFSERVE_LOG_LEVEL", "INFO")
ENV_DISABLE_PROGRESS_BAR = os.environ.get("DIFFSERVE_DISABLE_PROGRESS_BAR", "0") not in ("", "0", "false")
# Modules imported at start, before a model is resolved: plugins that call
# diffserve.registry.register_model (comma-separated module names).
ENV_PLUGINS = [name.strip() for name in os.environ.get("DIFFSERVE_PLUGINS", "").split(",") if name.strip()]
# `diffserve serve`'s API key when --api-key is not given (keeps the key out of the process list).
ENV_API_KEY = os.environ.get("DIFFSERVE_API_KEY") or None
# Set by torchrun (multi-node runs): this process is one rank of an SPMD launch.
ENV_TORCHRUN = {k: int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}

# dtype names users may give -> torch dtype attribute
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
CACHE_BACKENDS = (None, "cache_dit", "tea_cache")
# Which implementation serves a checkpoint: diffserve's own pipeline ("native") or diffusers' pipeline
# through the adapter ("diffusers"); "auto" picks native when diffserve registers the pipeline class.
BACKENDS = ("auto", "native", "diffusers")


class UnknownKeyError(TypeError):
    """A config, keyword or request field that does not exist (a TypeError, as for bad keywords)."""


def check_known_keys(kind: str, given: dict[str, Any], allowed: list[str]) -> None:
    """Raise UnknownKeyError naming every unknown key of `given` and listing the allowed ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise UnknownKeyError(
            f"unknown {kind} key(s): {', '.join(map(repr, unknown))}. "
            f"Allowed: {', '.join(sorted(allowed))}"
        )


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class DiffusionParallelConfig:
    """How the processes are split. world_size = replica_world_size * data_parallel_size.

    One replica is a worker group of replica_world_size = tp * ulysses * ring * cfg ranks, whose
    process groups are ordered tp -> sp (ulysses x ring) -> cfg. HSDP shards the transformer's weights
    across a replica (it cannot be combined with TP, which shards the same weights); on its own (no
    SP/CFG) it needs hsdp_shard_size and then sets the replica's size itself. data_parallel_size
    replicas each run whole requests on their own devices (replica r on ranks [r * k, (r + 1) * k) of
    k = replica_world_size); they never communicate, so dp is not a dimension of any process group.
    """

    tensor_parallel_size: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_parallel_size: int = 1
    data_parallel_size: int = 1
    use_hsdp: bool = False
    # -1: replica_world_size // hsdp_replicate_size.
    hsdp_shard_size: int = -1
    hsdp_replicate_size: int = 1
    vae_patch_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in (
            "tensor_parallel_size",
            "ulysses_degree",
            "ring_degree",
            "cfg_parallel_size",
            "data_parallel_size",
            "hsdp_replicate_size",
            "vae_patch_parallel_size",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.cfg_parallel_size not in (1, 2):
            raise ValueError(
                f"cfg_parallel_size must be 1 or 2 (one rank per CFG branch), got {self.cfg_parallel_size}"
            )
        if not isinstance(self.use_hsdp, bool):
            raise ValueError(f"use_hsdp must be a bool, got {self.use_hsdp!r}")
        if self.hsdp_shard_size != -1:
            _check_positive_int("hsdp_shard_size", self.hsdp_shard_size)
        if self.use_hsdp:
            if self.tensor_parallel_size > 1:
                raise ValueError(
                    "use_hsdp cannot be combined with tensor_parallel_size > 1: HSDP shards the same "
                    "weights TP does. Use one or the other."
                )
            if self._model_parallel_size == 1 and self.hsdp_shard_size == -1:
                raise ValueError(
                    "HSDP on its own needs hsdp_shard_size (how many ranks share the weights, e.g. 2); "
                    "with SP or CFG parallel it defaults to the whole replica"
                )
            shard = self.resolved_hsdp_shard_size
            if shard * self.hsdp_replicate_size != self.replica_world_size:
                raise ValueError(
                    f"hsdp_shard_size ({shard}) x hsdp_replicate_size ({self.hsdp_replicate_size}) must equal "
                    f"the ranks of one replica ({self.replica_world_size})"
                )
        elif self.hsdp_shard_size != -1 or self.hsdp_replicate_size != 1:
            raise ValueError("hsdp_shard_size / hsdp_replicate_size are only meaningful with use_hsdp=True")
        if self.vae_patch_parallel_size > self.replica_world_size:
            raise ValueError(
                f"vae_patch_parallel_size ({self.vae_patch_parallel_size}) cannot exceed the ranks of one "
                f"replica ({self.replica_world_size})"
            )
        if self.replica_world_size % self.vae_patch_parallel_size:
            raise ValueError(
                f"vae_patch_parallel_size ({self.vae_patch_parallel_size}) must divide the ranks of one replica "
                f"({self.replica_world_size}): the ranks decode in groups of that size"
            )

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def _model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.sequence_parallel_size * self.cfg_parallel_size

    @property
    def replica_world_size(self) -> int:
        """Processes of one replica (one worker group, one process group). HSDP on its own adds ranks
        that share the weights and repeat the same work."""
        if self.use_hsdp and self._model_parallel_size == 1 and self.hsdp_shard_size != -1:
            return self.hsdp_shard_size * self.hsdp_replicate_size
        return self._model_parallel_size

    @property
    def world_size(self) -> int:
        """Processes (devices) needed in all: every replica's ranks."""
        return self.replica_world_size * self.data_parallel_size

    @property
    def resolved_hsdp_shard_size(self) -> int:
        if self.hsdp_shard_size == -1:
            return self.replica_world_size // self.hsdp_replicate_size
        return self.hsdp_shard_size

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiffusionParallelConfig":
        check_known_keys("parallel config", values, _field_names(cls))
        return cls(**values)


PARALLEL_KEYS = _field_names(DiffusionParallelConfig)


def check_lora_modules(modules: Any) -> None:
    """{name: path}: names a request (and `model="base:name"` on the server) can use, existing paths."""
    if not isinstance(modules, dict):
        raise ValueError(f"lora_modules must be a dict {{name: path to a .safetensors file}}, got {modules!r}")
    for name, path in modules.items():
        if not isinstance(name, str) or not name or any(c in name for c in ":= \t\n"):
            raise ValueError(f"LoRA adapter name {name!r} must be a non-empty string without ':', '=' or spaces")
        if not isinstance(path, str) or not os.path.exists(path):
            raise ValueError(f"LoRA adapter {name!r}: {path!r} does not exist")


BATCHING_MODES = ("request", "step")


@dataclass
class OmniDiffusionConfig:
    """Everything the engine needs to build and run one model."""

    model: str
    # "auto": the native pipeline if the registry has the checkpoint's class, else diffusers' pipeline
    # through the adapter if diffusers has it; "native" or "diffusers" force one (see registry.py).
    backend: str = "auto"
    # "auto": bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs).
    dtype: str = "auto"
    # "auto": cuda if available, else cpu.
    device: str = "auto"
    revision: str | None = None
    parallel_config: DiffusionParallelConfig = field(default_factory=DiffusionParallelConfig)
    # None: DIFFSERVE_ATTENTION_BACKEND or "sdpa".
    attention_backend: str | None = None
    cache_backend: str | None = None
    # A dict of the backend's options (or its typed config, diffserve.cache.config); parsed into
    # the typed config in __post_init__ (None without a backend).
    cache_config: Any = field(default_factory=dict)
    # Model-level CPU offload: encoders, denoisers and VAEs take turns on the device (docs/offload.md).
    enable_cpu_offload: bool = False
    # Layerwise CPU offload: the denoisers' blocks stream through the device, encoders and VAEs take
    # turns (with enable_cpu_offload too, the same).
    enable_layerwise_offload: bool = False
    # Layerwise offload: blocks copied ahead of the running one (0: each block only when it runs).
    layerwise_prefetch: int = 1
    # Layerwise offload: blocks of each denoiser that stay on the device, spread evenly through the call
    # order (fewer bytes cross to the device per step; more stay there).
    layerwise_resident_blocks: int = 0
    # Tokens the denoisers' feed-forward layers take at a time (None: whole sequences): the hidden
    # activation of a long sequence then exists one chunk at a time (diffserve.layers.mlp).
    ffn_chunk_size: int | None = None
    # Decode large latents in overlapping tiles (the VAE's own tile size); implied by
    # parallel_config.vae_patch_parallel_size > 1, which spreads the tiles over ranks.
    vae_use_tiling: bool = False
    # Encode and decode a batch one sample at a time (the VAE's memory no longer grows with the batch).
    vae_use_slicing: bool = False
    # GiB of weights the device may hold; checked at start against an estimate for the chosen offload
    # mode, naming the modes that would fit. None: the device's total memory on CUDA, no check on a CPU.
    max_gpu_memory: float | None = None
    # False: compile the transformer's repeated blocks with torch.compile on CUDA.
    enforce_eager: bool = False
    # Record each denoiser's forward as a CUDA graph per input signature and replay it
    # (diffserve.cuda_graphs): the host no longer issues every kernel. CUDA, one process per replica.
    cuda_graphs: bool = False
    # "fp8": the denoisers' linear layers compute in float8 (per-channel weight and per-token
    # activation scales; diffserve.layers.quantization). None: the model's dtype.
    quantization: str | None = None
    # With quantization: the first N denoise steps of each request compute with the original weights,
    # kept beside the quantized ones (more memory; diffserve.layers.quantization.StepPrecision).
    unquantized_steps: int = 0
    # Most prompts the engine merges into one pipeline call.
    max_batch_size: int = 4
    # "request": a batch is formed when it starts and runs to its end. "step": requests join and leave
    # a running batch between denoise steps (diffserve.engine.step_batching, docs/step_batching.md).
    batching: str = "request"
    # batching="step": steps a waiting request that cannot join the running batch lets pass before the
    # batch stops admitting and drains, so that request starts next.
    step_max_wait: int = 8
    # batching="step": when that fairness rule fires, park the running requests (their denoising states
    # stay on the device) and start the waiting one at once, instead of draining the batch first.
    step_preemption: bool = False
    # batching="step": a request joins the running batch only while the batch's activation tokens
    # (samples x latent tokens x CFG branches, diffserve.engine.cost.activation_tokens) stay within this.
    # None: only max_batch_size bounds the batch.
    step_max_batch_tokens: int | None = None
    # batching="step": a request joins only while the batch's measured step time with it stays within
    # this many milliseconds. None: no latency cap.
    step_latency_target_ms: float | None = None
    # batching="step": a request joins only while the bigger batch's measured step time per sample is at
    # least this fraction lower than the batch's without it (0 < gain < 1): no growth past the size where
    # the GPU is saturated, which would only slow every running request. None: no such cap.
    step_min_batch_gain: float | None = None
    # batching="step": encode and prepare joining requests, and decode finished ones, on a background
    # thread (its own CUDA stream on a GPU) while the running batch keeps stepping. Opt-in: on FLUX.1-dev
    # it measured 1.00x inline stages on an H200, its encode and decode being short (docs/step_batching.md).
    step_overlap_stages: bool = False
    disable_progress_bar: bool = ENV_DISABLE_PROGRESS_BAR
    # Where start_profile()/stop_profile() write traces; None: ./diffserve_profiles.
    profile_dir: str | None = None
    # LoRA adapters loaded at start, {name: path to a .safetensors file}; a request picks some with
    # the sampling parameter lora={name: scale} (diffserve.lora).
    lora_modules: dict[str, str] = field(default_factory=dict)

    # Filled from model_index.json by the registry; not user settings.
    model_class_name: str | None = field(default=None, init=False)
    model_config: dict[str, Any] = field(default_factory=dict, init=False)
    # "module:ClassName" of the pipeline (built-in or registered), imported by every worker.
    pipeline_import_path: str | None = field(default=None, init=False)
    # The backend the registry chose: "native" or "diffusers".
    resolved_backend: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty path or hub id, got {self.model!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported. Allowed: auto, {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if isinstance(self.parallel_config, dict):
            self.parallel_config = DiffusionParallelConfig.from_dict(self.parallel_config)
        if self.parallel_config.data_parallel_size > 1 and self.device.startswith("cuda:"):
            raise ValueError(
                f"device {self.device!r} names one GPU, but data_parallel_size="
                f"{self.parallel_config.data_parallel_size} places replica r on GPUs [r*k, (r+1)*k) of the visible "
                "ones; use device 'cuda' or 'auto' (choose the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(
                    f"device {self.device!r} was asked for but CUDA is not available (torch {torch.__version__} "
                    "sees no GPU); use device 'cpu' or 'auto'"
                )
        if self.attention_backend is None:
            self.attention_backend = ENV_ATTENTION_BACKEND
        if self.cache_backend not in CACHE_BACKENDS:
            raise ValueError(
                f"cache_backend must be one of {', '.join(map(str, CACHE_BACKENDS))}, got {self.cache_backend!r}"
            )
        from diffserve.cache.config import parse_cache_config  # the cache package imports this module

        self.cache_config = parse_cache_config(self.cache_backend, self.cache_config)
        self._check_cfg_truncation()
        _check_positive_int("max_batch_size", self.max_batch_size)
        self._check_batching()
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be None or 'fp8', got {self.quantization!r}")
        self._check_unquantized_steps()
        check_lora_modules(self.lora_modules)
        self._check_memory_options()
        self._check_cuda_graphs()

    def _check_cuda_graphs(self) -> None:
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if not self.cuda_graphs:
            return
        if self.resolved_device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, the engine would run on {self.resolved_device} "
                             f"(device={self.device!r}); leave cuda_graphs off")
        # A replay runs only what was recorded: per-call Python decisions would be frozen.
        frozen = {
            "cache_backend": self.cache_backend is not None,  # decides per step whether to run the blocks
            "enable_cpu_offload": self.enable_cpu_offload,  # moves weights in hooks
            "enable_layerwise_offload": self.enable_layerwise_offload,
            "lora_modules": bool(self.lora_modules),  # switches adapters per request
            "batching='step'": self.batching == "step",  # changes the batch every step
            "a parallel replica (replica_world_size > 1)": self.parallel_config.replica_world_size > 1,
        }
        clashes = [name for name, on in frozen.items() if on]
        if clashes:
            raise ValueError(f"cuda_graphs cannot be combined with {', '.join(clashes)} (a recorded graph replays "
                             "fixed work); drop one of them")

    def _check_unquantized_steps(self) -> None:
        steps = self.unquantized_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"unquantized_steps must be a whole number of steps (0 or more), got {steps!r}")
        if steps == 0:
            return
        if self.quantization is None:
            raise ValueError(f"unquantized_steps={steps} needs quantization='fp8' (without it every step is "
                             "unquantized); set quantization or leave unquantized_steps 0")
        # Each of these holds or moves the weights itself, and would not carry the second copy.
        clashes = [name for name, on in {
            "cuda_graphs": self.cuda_graphs,  # a replay would keep the precision it was recorded with
            "enable_cpu_offload": self.enable_cpu_offload,
            "enable_layerwise_offload": self.enable_layerwise_offload,
            "use_hsdp": self.parallel_config.use_hsdp,
        }.items() if on]
        if clashes:
            raise ValueError(f"unquantized_steps cannot be combined with {', '.join(clashes)}; drop one of them")

    def _check_cfg_truncation(self) -> None:
        # TeaCache's cfg_truncation_step picks the branches of the whole call by one request's step.
        if getattr(self.cache_config, "cfg_truncation_step", -1) < 0:
            return
        if self.batching == "step":
            raise ValueError("tea_cache cfg_truncation_step cannot be used with batching='step' (the requests of "
                             "one call are at different steps); use batching='request' or leave it -1")
        if self.parallel_config.cfg_parallel_size > 1:
            raise ValueError("tea_cache cfg_truncation_step cannot be used with cfg_parallel_size=2 (both ranks "
                             "would run the same conditional branch: no saving); use cfg_parallel_size=1")

    def _check_batching(self) -> None:
        # batching="step" takes step caches (they keep a state per request) and parallel groups (every
        # rank gets the same step calls, so the group steps as one): docs/step_batching.md.
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")
        _check_positive_int("step_max_wait", self.step_max_wait)
        self._check_step_caps()
        self._check_step_overlap()

    def _check_step_overlap(self) -> None:
        overlap = self.step_overlap_stages
        if not isinstance(overlap, bool):
            raise ValueError(f"step_overlap_stages must be a bool, got {overlap!r}")
        if not overlap:
            return
        if self.batching != "step":
            raise ValueError("step_overlap_stages applies to batching='step' only; use batching='step' or leave it False")
        if self.enable_cpu_offload or self.enable_layerwise_offload:
            raise ValueError("step_overlap_stages cannot be used with CPU offload (the encoders and VAE take "
                             "turns with the transformer on the device); leave it False")
        if self.parallel_config.replica_world_size > 1:
            raise ValueError("step_overlap_stages needs one process per replica (the ranks of a parallel group "
                             "must agree on when a request joins); leave it False")

    def _check_step_caps(self) -> None:
        if not isinstance(self.step_preemption, bool):
            raise ValueError(f"step_preemption must be a bool, got {self.step_preemption!r}")
        if self.step_max_batch_tokens is not None:
            _check_positive_int("step_max_batch_tokens", self.step_max_batch_tokens)
        target = self.step_latency_target_ms
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0):
            raise ValueError(f"step_latency_target_ms must be a positive number of milliseconds (or None), "
                             f"got {target!r}")
        self._check_step_min_batch_gain()

    def _check_step_min_batch_gain(self) -> None:
        gain = self.step_min_batch_gain
        if gain is None:
            return
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 < gain < 1:
            raise ValueError(f"step_min_batch_gain must be a number between 0 and 1, exclusive (the fraction of "
                             f"step time per sample a bigger batch must save), or None, got {gain!r}")
        if self.batching != "step":
            raise ValueError("step_min_batch_gain applies to batching='step' only; use batching='step' or leave it None")

    def _check_memory_options(self) -> None:
        for name in ("enable_cpu_offload", "enable_layerwise_offload", "vae_use_tiling", "vae_use_slicing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        prefetch = self.layerwise_prefetch
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"layerwise_prefetch must be an integer >= 0 (blocks fetched ahead), got {prefetch!r}")
        if prefetch != 1 and not self.enable_layerwise_offload:
            raise ValueError("layerwise_prefetch is only meaningful with enable_layerwise_offload=True")
        resident = self.layerwise_resident_blocks
        if isinstance(resident, bool) or not isinstance(resident, int) or resident < 0:
            raise ValueError(f"layerwise_resident_blocks must be an integer >= 0 (blocks kept on the device), "
                             f"got {resident!r}")
        if resident and not self.enable_layerwise_offload:
            raise ValueError("layerwise_resident_blocks is only meaningful with enable_layerwise_offload=True")
        chunk = self.ffn_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"ffn_chunk_size must be None or a positive number of tokens, got {chunk!r}")
        budget = self.max_gpu_memory
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
            raise ValueError(f"max_gpu_memory must be a positive number of GiB, got {budget!r}")
        if self.parallel_config.use_hsdp and (self.enable_cpu_offload or self.enable_layerwise_offload):
            raise ValueError(
                "CPU offload cannot be combined with use_hsdp: HSDP (FSDP2) owns the denoisers' memory and "
                "already keeps only a shard of it on each device. Use one or the other."
            )

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "OmniDiffusionConfig":
        """Build from flat keywords, as `Omni(model, tensor_parallel_size=2, ...)` takes them."""
        own = _field_names(cls)
        check_known_keys("engine config", kwargs, [k for k in own if k != "model"] + PARALLEL_KEYS)
        parallel = {k: kwargs.pop(k) for k in list(kwargs) if k in PARALLEL_KEYS}
        if parallel:
            if "parallel_config" in kwargs:
                raise TypeError(
                    f"pass either parallel_config or the flat parallel keys ({', '.join(parallel)}), not both"
                )
            kwargs["parallel_config"] = DiffusionParallelConfig.from_dict(parallel)
        return cls(model=model, **kwargs)

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device.type == "cuda" else torch.float32
        return getattr(torch, DTYPES[self.dtype])

    @property
    def resolved_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
