"""The SD3 transformer under tensor and sequence parallelism (2 gloo processes on CPU) equals the
single-process model: TP shards its layers, and the `_sp_plan` splits image and text tokens and
gathers the image tokens back."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from diffserve.config import DiffusionParallelConfig
from diffserve.engine.multiproc_executor import get_free_port
from tests.models.sd3.test_sd3_transformer import load_ours, random_inputs

# fp32 on CPU. Measured max-abs difference to the single process: 4.8e-7 (TP: partial products summed
# across ranks), 4.8e-7 (Ulysses) and 7.2e-7 (ring: partial attentions merged by log-sum-exp).
TOLERANCE = 1e-5

MODES = {
    "tp": dict(tensor_parallel_size=2),
    "ulysses": dict(ulysses_degree=2),
    "ring": dict(ring_degree=2),
}


class _Holder(nn.Module):
    """The smallest pipeline: sequence parallelism finds its denoiser under `transformer`."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer


def _rank_main(rank: int, port: int, folder: str, expected_path: str) -> None:
    from diffserve.distributed import parallel_state as ps
    from diffserve.distributed.sequence_parallel import apply_sequence_parallel

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    ps.init_distributed_environment(rank, 2, "gloo")
    expected = torch.load(expected_path)
    try:
        # One process group, new parallel groups per mode: spawning costs more than the test itself.
        for mode, sizes in MODES.items():
            config = DiffusionParallelConfig(**sizes)
            ps.initialize_model_parallel(config, "cpu")
            model = load_ours(folder)
            apply_sequence_parallel(_Holder(model), config)
            with torch.no_grad():
                for skip_layers, reference in expected.items():
                    actual = model(**random_inputs(txt_len=12), skip_layers=list(skip_layers) or None)
                    error = (actual - reference).abs().max().item()
                    assert error <= TOLERANCE, f"rank {rank}, {mode}, skip_layers={skip_layers}: max-abs {error}"
    finally:
        ps.destroy_model_parallel()


@pytest.mark.slow  # tests/distributed/test_parallel.py checks SD3 and SD3.5-medium in the default run
def test_tensor_and_sequence_parallel_match_single_process(tiny_checkpoint, tmp_path):
    # SD3.5-medium: the dual-attention blocks' image self-attention is split too.
    folder = f"{tiny_checkpoint('sd3.5-medium')}/transformer"
    model = load_ours(folder)
    with torch.no_grad():
        # The text length (12) and the image tokens (8 x 10) both divide by the degree.
        expected = {skip: model(**random_inputs(txt_len=12), skip_layers=list(skip) or None) for skip in [(), (1,)]}
    torch.save(expected, tmp_path / "expected.pt")
    mp.start_processes(
        _rank_main, args=(get_free_port(), folder, str(tmp_path / "expected.pt")), nprocs=2, start_method="spawn"
    )
