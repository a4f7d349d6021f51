"""A worker owns one device: it loads the pipeline, applies engine features, and runs requests."""

from __future__ import annotations

import logging
import os
import time

import torch

from diffserve.compile import compile_repeated_blocks
from diffserve.config import OmniDiffusionConfig
from diffserve.layers.attention import select_attention_backend, set_attention_backend
from diffserve.loader import DiffusersPipelineLoader
from diffserve.models.interface import discover_components
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


class DiffusionWorker:
    def __init__(self, od_config: OmniDiffusionConfig, rank: int = 0, local_rank: int = 0):
        self.od_config = od_config
        self.rank = rank
        self.device = init_device(od_config, local_rank)
        self.pipeline = DiffusersPipelineLoader(od_config).load_model(self.device)
        self.apply_features()
        self.pre_process = get_pre_process_func(od_config)
        self.post_process = get_post_process_func(od_config)
        self._profiler: torch.profiler.profile | None = None

    def apply_features(self) -> None:
        backend = select_attention_backend(self.od_config.attention_backend, self.device, self.od_config.torch_dtype)
        set_attention_backend(self.pipeline, backend)
        if not self.od_config.enforce_eager:
            if self.device.type == "cuda":
                for module in discover_components(self.pipeline)["dit"].values():
                    compile_repeated_blocks(module)
            else:
                logger.info("torch.compile is used on CUDA only; running eagerly on %s", self.device)

    @torch.inference_mode()
    def execute(self, req: OmniDiffusionRequest) -> DiffusionOutput:
        start = time.perf_counter()
        if self.pre_process is not None:
            req = self.pre_process(req)
        output = self.pipeline(req)
        if self.post_process is not None:
            output = self.post_process(output, req.sampling_params.output_type)
        output.metrics["pipeline_s"] = time.perf_counter() - start
        return output

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
