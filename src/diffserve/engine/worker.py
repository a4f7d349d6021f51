"""A worker owns one device: it loads the pipeline, applies engine features, and runs requests."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from typing import Callable

import torch
import torch.nn as nn

from diffserve.cache import make_cache_backend
from diffserve.compile import compile_repeated_blocks
from diffserve.cuda_graphs import use_cuda_graphs
from diffserve.config import OmniDiffusionConfig
from diffserve.distributed import parallel_state as ps
from diffserve.distributed.hsdp import shard_denoisers
from diffserve.distributed.sequence_parallel import apply_sequence_parallel
from diffserve.distributed.vae_patch import apply_vae_slicing, apply_vae_tiling
from diffserve.engine.cost import CostProfile, profile_denoisers
from diffserve.engine.errors import RequestAborted
from diffserve.engine.stages import StageJobs, StageResult
from diffserve.layers.attention import select_attention_backend, set_attention_backend
from diffserve.layers.mlp import set_ffn_chunk_size
from diffserve.layers.quantization import StepPrecision, check_fp8_supported, quantize_linear_layers
from diffserve.loader import DiffusersPipelineLoader
from diffserve.lora import LoRAManager
from diffserve.memory import PeakMemory, peak_host_rss_bytes
from diffserve.models.base import PipelineRun
from diffserve.models.denoise import batch_rows, denoise_step
from diffserve.models.interface import discover_components, is_repeated_block
from diffserve.models.outputs import POST_PROCESS
from diffserve.models.spec import SamplingSpec
from diffserve.offload import apply_offload, offload_mode
from diffserve.offload.budget import check_fits
from diffserve.registry import get_post_process_func, get_pre_process_func
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)


def init_device(od_config: OmniDiffusionConfig, local_rank: int = 0) -> torch.device:
    device = od_config.resolved_device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} was asked for but CUDA is not available")
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        torch.cuda.set_device(device)
    return device


def init_parallel_state(od_config: OmniDiffusionConfig, rank: int, world_size: int, local_rank: int) -> None:
    """Join the process group (MASTER_ADDR/PORT from the environment) and build diffserve's groups."""
    device = init_device(od_config, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    ps.init_distributed_environment(rank, world_size, backend)
    ps.initialize_model_parallel(od_config.parallel_config, device.type)


def local_param_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds (a sharded DTensor counts only its local shard)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


class AbortFlag:
    """Set (value 1) from another thread to stop the running request; a worker process gets a
    multiprocessing.Value with the same `value` attribute, shared with the engine."""

    value: int = 0


class DiffusionWorker:
    def __init__(self, od_config: OmniDiffusionConfig, rank: int = 0, local_rank: int = 0, abort_flag=None):
        self.od_config = od_config
        self.rank = rank
        self.abort_flag = abort_flag if abort_flag is not None else AbortFlag()
        self.device = init_device(od_config, local_rank)
        start = time.perf_counter()
        self.pipeline = self.load_pipeline()
        # Adapters attach to the linear layers before compile sees them (in the activations' dtype,
        # which quantized weights are not).
        self.lora = (LoRAManager(self.pipeline, od_config.lora_modules, od_config.torch_dtype)
                     if od_config.lora_modules else None)
        if self.lora is not None and offload_mode(od_config):
            # Loaded on the host with the layers; adapters are small and stay on the device.
            self.lora.to(self.device)
        # The engine logs it for every rank and the server exports it.
        self._load_report = {"load_s": time.perf_counter() - start, "peak_host_bytes": peak_host_rss_bytes()}
        self.apply_features()
        self.pre_process = get_pre_process_func(od_config)
        self.post_process = get_post_process_func(od_config) or POST_PROCESS[self.sampling_spec().modality]
        self._profiler: torch.profiler.profile | None = None
        # batching="step": the running requests by id, each between the pipeline's begin and finish.
        self._running: dict[str, PipelineRun] = {}
        self._parked: dict[str, PipelineRun] = {}  # preempted at a step boundary, resumed later
        # Their begin and finish jobs: inline, or overlapped with the steps (step_overlap_stages).
        self._stages = StageJobs(self.device, od_config.step_overlap_stages)

    def load_pipeline(self) -> nn.Module:
        """Load on the device; with CPU offload on the host (the offloader brings weights over as they
        are used); under HSDP each rank allocates and reads only its shards of the denoisers."""
        od_config = self.od_config

        def prepare(pipeline: nn.Module) -> None:
            check_fits(pipeline, od_config, self.device)  # before anything is allocated
            if od_config.parallel_config.use_hsdp:
                shard_denoisers(pipeline, ps.get_hsdp_mesh(), self.device)

        load_device = torch.device("cpu") if offload_mode(od_config) else self.device
        return DiffusersPipelineLoader(od_config).load_model(load_device, prepare)

    def load_report(self) -> dict:
        """This rank's load time (s) and peak host memory (bytes)."""
        return dict(self._load_report)

    def apply_features(self) -> None:
        if self.od_config.quantization is not None:
            self._quantize(self.od_config.quantization)
        backend = select_attention_backend(self.od_config.attention_backend, self.device, self.od_config.torch_dtype)
        set_attention_backend(self.pipeline, backend)
        if self.od_config.ffn_chunk_size is not None:
            self._chunk_feed_forwards(self.od_config.ffn_chunk_size)
        if self.od_config.parallel_config.sequence_parallel_size > 1:
            apply_sequence_parallel(self.pipeline, self.od_config.parallel_config)
        if self.od_config.vae_use_tiling or self.od_config.parallel_config.vae_patch_parallel_size > 1:
            # A pipeline whose VAEs tile themselves (the diffusers adapter: diffusers' enable_tiling) says so.
            if hasattr(self.pipeline, "enable_vae_tiling"):
                self.pipeline.enable_vae_tiling()
            else:
                apply_vae_tiling(self.pipeline)
        if self.od_config.vae_use_slicing:
            # The same for slicing (diffusers' enable_slicing).
            if hasattr(self.pipeline, "enable_vae_slicing"):
                self.pipeline.enable_vae_slicing()
            else:
                apply_vae_slicing(self.pipeline)
        if self.rank != 0 and hasattr(self.pipeline, "set_progress_bar_config"):
            self.pipeline.set_progress_bar_config(disable=True)
        if not self.od_config.enforce_eager:
            if self.device.type == "cuda":
                for module in discover_components(self.pipeline)["dit"].values():
                    compile_repeated_blocks(module)
            else:
                logger.info("torch.compile is used on CUDA only; running eagerly on %s", self.device)
        # Step caching swaps the transformers' block lists per forward; compiled blocks stay compiled.
        self.cache_backend = make_cache_backend(self.od_config)
        if self.cache_backend is not None:
            self.cache_backend.enable(self.pipeline)
        # Last: its hooks wrap whatever the features above installed (tiled decode, caches, compile).
        self.offloader = apply_offload(self.pipeline, self.od_config, self.device)
        if self.od_config.cuda_graphs:  # the config made sure the device is CUDA
            for module in discover_components(self.pipeline)["dit"].values():
                use_cuda_graphs(module)
        if self.od_config.parallel_config.replica_world_size == 1 and not self._blocks_compiled():
            self._stop_between_blocks()

    def _quantize(self, method: str) -> None:
        """Convert the denoisers' linear layers after loading (under TP, each rank its own shard)."""
        check_fp8_supported(self.device)
        steps = self.od_config.unquantized_steps
        precision = StepPrecision(steps) if steps else None
        for path, module in discover_components(self.pipeline)["dit"].items():
            count = quantize_linear_layers(module, method, self.device, precision)
            logger.info("%s: %d linear layers compute in %s%s", path, count, method,
                        f" after the first {steps} steps of each request" if steps else "")
        self.pipeline.step_precision = precision

    def _chunk_feed_forwards(self, chunk_size: int) -> None:
        denoisers = discover_components(self.pipeline)["dit"]
        count = sum(set_ffn_chunk_size(module, chunk_size) for module in denoisers.values())
        if count == 0:
            raise ValueError(f"ffn_chunk_size: {type(self.pipeline).__name__}'s transformers have no diffserve "
                             "feed-forward layers to chunk (a diffusers-adapter pipeline runs diffusers' own); "
                             "leave ffn_chunk_size unset")
        logger.info("%d feed-forward layers take %d tokens at a time", count, chunk_size)

    def _blocks_compiled(self) -> bool:
        return not self.od_config.enforce_eager and self.device.type == "cuda"

    def _stop_between_blocks(self) -> None:
        """A very long step (a huge image on a CPU) stops at the next block, not only at the next step.
        One process only: ranks could not agree at a block without a collective per block, and not on
        compiled blocks, where the check would be traced."""

        def check(module, args):
            if self.abort_flag.value:
                raise RequestAborted("the request was stopped")

        for transformer in discover_components(self.pipeline)["dit"].values():
            names = set(getattr(transformer, "_repeated_blocks", ()))
            for module in transformer.modules():
                if is_repeated_block(module, names):
                    module.register_forward_pre_hook(check)

    def _on_step(self, progress: Callable[[int, int], None] | None):
        """The per-step callback: report progress (rank 0), then stop if any rank was told to; every
        rank decides at the same step, so no rank is left waiting in a collective."""

        def on_step(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            if ps.any_rank(bool(self.abort_flag.value)):
                raise RequestAborted("the request was stopped")

        return on_step

    def sampling_spec(self) -> SamplingSpec:
        """What the loaded model takes and makes (the engine validates requests against it)."""
        spec = getattr(self.pipeline, "spec", None)
        if not isinstance(spec, SamplingSpec):
            raise TypeError(
                f"{type(self.pipeline).__name__} declares no SamplingSpec: derive it from "
                "diffserve.models.base.DiffusionPipelineBase and implement sampling_spec()"
            )
        return spec

    def execute(
        self, req: OmniDiffusionRequest, progress: Callable[[int, int], None] | None = None
    ) -> DiffusionOutput:
        """Run one (batched) request. `progress(steps_done, total_steps)` is called after each step.
        The request stops with RequestAborted at the next step (or block) once `abort_flag` is set."""
        start = time.perf_counter()
        memory = PeakMemory.for_device(self.device)
        if memory is not None:
            memory.reset()
        reports_progress = hasattr(self.pipeline, "set_step_callback")
        if reports_progress:
            self.pipeline.set_step_callback(self._on_step(progress))
        with self._grad_off():
            req = self._prepare_request(req)
            if self.cache_backend is not None:
                self.cache_backend.refresh(self.pipeline, req.sampling_params.num_inference_steps)
            try:
                output = self.pipeline(req)
            finally:
                if reports_progress:
                    self.pipeline.set_step_callback(None)
            output = self._post_process(output, req)
        output.metrics["pipeline_s"] = time.perf_counter() - start
        if memory is not None:
            # The stages' peaks (StageTimer) cover the pipeline up to its last stage; the rest is read here.
            output.metrics["peak_gpu_bytes"] = max(output.metrics.get("peak_gpu_bytes", 0), memory.peak())
        if self.cache_backend is not None:
            output.metrics.update(self.cache_backend.request_metrics())
        return output

    def _grad_off(self):
        # FSDP2's parameter all-gathers cannot run under inference mode; no_grad is enough there.
        return torch.no_grad() if self.od_config.parallel_config.use_hsdp else torch.inference_mode()

    def _prepare_request(self, req: OmniDiffusionRequest) -> OmniDiffusionRequest:
        self._activate_lora(req)
        return self._pre_process(req)

    def _activate_lora(self, req: OmniDiffusionRequest) -> None:
        if self.lora is not None:
            self.lora.activate(req.sampling_params.lora)

    def _pre_process(self, req: OmniDiffusionRequest) -> OmniDiffusionRequest:
        return self.pre_process(req) if self.pre_process is not None else req

    def _post_process(self, output: DiffusionOutput, req: OmniDiffusionRequest) -> DiffusionOutput:
        if self.post_process is not None and self.rank == 0:
            output = self.post_process(output, req.sampling_params.output_type)
        return output

    # -- batching="step" (diffserve.engine.step_batching decides; the worker runs) -----------------

    def supports_step_batching(self) -> bool:
        return bool(getattr(self.pipeline, "supports_step_batching", False))

    def step_stages(self, overlap: bool) -> None:
        """Run begin and finish jobs overlapped with the steps or inline, as the step batcher's engine
        config says (called when a batcher starts; jobs still running are waited for, and a batcher
        drops the results of requests it does not hold)."""
        if overlap == self._stages.overlapped:
            return
        self._stages.close()
        self._stages = StageJobs(self.device, overlap)

    def step_begin(self, request_id: str, req: OmniDiffusionRequest) -> None:
        """Start encoding and preparing `req` (with step_overlap_stages on the stage thread while the
        steps go on, else now); it runs from the step_run after the step_collect that reports it begun.
        Its LoRA set is activated here, on the step thread: adapters live in the denoisers only, and the
        running requests share the step key, hence that set."""
        self._activate_lora(req)
        self._stages.submit("begin", request_id, lambda: self._begin(req))

    def _begin(self, req: OmniDiffusionRequest) -> PipelineRun:
        with self._grad_off():  # per thread
            run = self.pipeline.begin(self._pre_process(req))
        # Each request steps its own scheduler: FlowMatchEulerDiscreteScheduler keeps a step index.
        # Copied in the same job as begin, which set the shared one's timesteps.
        run.state.scheduler = copy.deepcopy(run.state.scheduler)
        return run

    def step_collect(self, wait: bool = False) -> list[tuple[str, str, object]]:
        """The begin and finish jobs done since the last call: ("begun", id, its number of steps) (it
        runs from the next step_run on), ("output", id, its DiffusionOutput) or ("error", id, the
        exception). `wait`: block until one is done (the step thread has nothing to step meanwhile). A
        request whose caller left meanwhile is reported too: the batcher drops it (step_drop)."""
        events = []
        for result in self._stages.collect(wait):
            rid = result.request_id
            if result.error is not None:
                events.append(("error", rid, result.error))
            elif result.kind == "begin":
                events.append(("begun", rid, self._join(result)))
            else:
                events.append(("output", rid, result.value))
        return events

    def _join(self, result: StageResult) -> int:
        run: PipelineRun = result.value
        self._stages.hand_over(result, run.state)
        if self.cache_backend is not None:  # its own cache state, as refresh() gives a request alone
            self.cache_backend.begin_request(result.request_id, run.req.sampling_params.num_inference_steps,
                                             run.state.scheduler)
        self._running[result.request_id] = run
        return len(run.state.timesteps)

    def step_run(self) -> tuple[int, float, list[str]]:
        """One step of every running request in one transformer call (one per expert or guidance
        variant the step needs: denoise_step). The samples stepped, the step's seconds (decodes
        excluded), and the ids of the requests that finished with this step: their decodes are
        submitted, their outputs come from step_collect."""
        runs = list(self._running.items())
        request_ids, states = [rid for rid, _ in runs], [run.state for _, run in runs]

        def call_scope(group: list[int]):
            return self._cache_rows([request_ids[i] for i in group], [states[i] for i in group])

        start = time.perf_counter()
        with self._grad_off():
            denoise_step(self.pipeline, states, call_scope)
            if self.device.type == "cuda":  # the step's time, not its launch's (the latency cap reads it)
                # This stream's only: an encode or decode on the stage stream must not hold the step up.
                torch.cuda.current_stream(self.device).synchronize()
            seconds = time.perf_counter() - start
        finished = [rid for rid, run in runs if run.state.done]
        for rid in finished:
            self._retire(rid)
        return sum(run.state.num_samples for _, run in runs), seconds, finished

    def step_park(self, request_ids: list[str]) -> None:
        """Take running requests out of the steps, keeping their states (preemption at a step boundary)."""
        for rid in request_ids:
            self._parked[rid] = self._running.pop(rid)

    def step_resume(self, request_ids: list[str]) -> None:
        """Parked requests step again from where they stopped, with their adapters active again (another
        step key, with other adapters, may have run meanwhile)."""
        for rid in request_ids:
            run = self._running[rid] = self._parked.pop(rid)
            if self.lora is not None:
                self.lora.activate(run.req.sampling_params.lora)

    def step_drop(self, request_ids: list[str]) -> None:
        """Forget running or parked requests (their callers left): their states are freed."""
        for rid in request_ids:
            if self._running.pop(rid, None) or self._parked.pop(rid, None):
                self._drop_cache_state(rid)

    def _drop_cache_state(self, request_id: str) -> None:
        if self.cache_backend is not None:
            self.cache_backend.finish_request(request_id)  # its metrics go nowhere: nobody waits for them

    @contextlib.contextmanager
    def _cache_rows(self, request_ids: list[str], states):
        """Around a transformer call of a step: the step cache knows whose rows the batch holds (each
        request keeps its own cache state)."""
        if self.cache_backend is None:
            yield
            return
        self.cache_backend.select_requests(list(zip(request_ids, batch_rows(states))))
        try:
            yield
        finally:
            self.cache_backend.select_requests(None)

    def _retire(self, request_id: str) -> None:
        """Submit a finished request's decode; its cache state ends here, on the step thread."""
        run = self._running.pop(request_id)
        cache_metrics = self.cache_backend.finish_request(request_id) if self.cache_backend is not None else {}
        self._stages.submit("finish", request_id, lambda: self._finish(run, cache_metrics))

    def _finish(self, run: PipelineRun, cache_metrics: dict) -> DiffusionOutput:
        with self._grad_off():
            output = self._post_process(self.pipeline.finish(run), run.req)
        output.metrics.update(cache_metrics)
        return output

    def step_reset(self) -> None:
        """Drop every running request (a step failed: its requests are answered with the error); parked
        ones were not in the failed call and stay."""
        for rid in self._running:
            self._drop_cache_state(rid)
        self._running.clear()

    def cost_profile(self) -> CostProfile:
        """What the engine needs to estimate a request's work (see diffserve.engine.cost)."""
        pc = self.od_config.parallel_config
        ranks = pc.tensor_parallel_size * pc.sequence_parallel_size * pc.cfg_parallel_size
        denoisers = list(discover_components(self.pipeline)["dit"].values())
        return profile_denoisers(denoisers, self.device, self.od_config.torch_dtype, pc.tensor_parallel_size, ranks)

    def dit_param_bytes(self) -> dict[str, int]:
        """Per denoiser module, the parameter bytes this rank holds."""
        return {name: local_param_bytes(m) for name, m in discover_components(self.pipeline)["dit"].items()}

    def start_profile(self, trace_dir: str) -> None:
        if self._profiler is not None:
            raise RuntimeError("profiling is already running; call stop_profile() first")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(trace_dir, exist_ok=True)
        self._trace_dir = trace_dir
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
        self._profiler.start()

    def stop_profile(self) -> str:
        if self._profiler is None:
            raise RuntimeError("profiling is not running; call start_profile() first")
        self._profiler.stop()
        path = os.path.join(self._trace_dir, f"trace_rank{self.rank}_{int(time.time() * 1000)}.json")
        self._profiler.export_chrome_trace(path)
        self._profiler = None
        return path

    def close(self) -> None:
        self._stages.close()
        self.pipeline = None
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
