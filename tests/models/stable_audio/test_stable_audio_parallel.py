"""Our Stable Audio DiT split by its `_sp_plan` (Ulysses, ring) or by tensor parallelism, in 2 gloo
processes on the CPU, equals the single-process output.

The plan splits the joined sequence [global token; frames]: the tiny checkpoint's 15 frames give 16
tokens. Measured max-abs differences (fp32): Ulysses2 0.0, ring2 4.8e-7, TP2 4.8e-7; tolerance 1e-5.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from diffserve.config import DiffusionParallelConfig
from diffserve.distributed import parallel_state as ps
from diffserve.distributed.sequence_parallel import apply_sequence_parallel

TOLERANCE = 1e-5
MODES = {
    "ulysses2": {"ulysses_degree": 2},
    "ring2": {"ring_degree": 2},
    "tp2": {"tensor_parallel_size": 2},
}


def _inputs(frames: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(2, 10, 32, generator=g)
    text[1, 6:] = 0  # padded text, zeroed as the pipeline does
    return dict(
        hidden_states=torch.randn(2, 6, frames, generator=g),
        timestep=torch.rand(1, generator=g),
        encoder_hidden_states=text,
        global_hidden_states=torch.randn(2, 1, 64, generator=g),
    )


def _load(folder: str):
    from tests.models.stable_audio.test_stable_audio_transformer import load_ours

    return load_ours(folder)


def _run_mode(rank: int, init_file: str, folder: str, mode: str) -> dict:
    """One parallel mode on this rank: its output, and the error a non-dividing length raises."""
    ps.init_distributed_environment(rank, 2, "gloo", init_method=f"file://{init_file}")
    config = DiffusionParallelConfig(**MODES[mode])
    ps.initialize_model_parallel(config, "cpu")
    try:
        model = _load(folder)
        holder = nn.Module()
        holder.transformer = model  # apply_sequence_parallel finds denoisers by component name
        apply_sequence_parallel(holder, config)
        result = {}
        with torch.no_grad():
            result["output"] = model(**_inputs(frames=15))
            if mode != "tp2":
                try:
                    model(**_inputs(frames=14))  # 15 tokens over 2 ranks
                except ValueError as error:
                    result["error"] = str(error)
        return result
    finally:
        ps.destroy_model_parallel()


def _worker(rank: int, tmp: str, folder: str) -> None:
    results = {mode: _run_mode(rank, os.path.join(tmp, f"init-{mode}"), folder, mode) for mode in MODES}
    if rank == 0:
        torch.save(results, os.path.join(tmp, "results.pt"))


@pytest.fixture(scope="module")
def parallel_results(tiny_checkpoint, tmp_path_factory):
    folder = f"{tiny_checkpoint('stable-audio')}/transformer"
    tmp = str(tmp_path_factory.mktemp("stable_audio_parallel"))
    mp.spawn(_worker, args=(tmp, folder), nprocs=2, join=True)
    with torch.no_grad():
        expected = _load(folder)(**_inputs(frames=15))
    return expected, torch.load(os.path.join(tmp, "results.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_parallel_mode_matches_single_process(parallel_results, mode):
    expected, results = parallel_results
    actual = results[mode]["output"]
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ulysses2", "ring2"])
def test_a_sequence_that_does_not_divide_is_an_error(parallel_results, mode):
    _, results = parallel_results
    assert "prepend_global output 0 has length 15 along dim 1, which does not divide" in results[mode]["error"]
