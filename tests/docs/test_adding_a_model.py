"""docs/adding_a_model.md is true: its worked example, extracted from the page and nothing else, is a
model the engine runs with every feature, each mode equal to its own one-process output (fp32, CPU,
gloo). The page's code blocks that start with `# file: NAME.py` are written out and imported."""

import re
import sys
from pathlib import Path

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.registry import register_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding_a_model.md"
BLOCK = re.compile(r"```python\n# file: (\S+)\n(.*?)```", re.S)
# Measured max-abs against one process (2026-11-30): TP2 1.4e-6, Ulysses2 1.5e-6, ring2 1.3e-6, CFG2
# 1.6e-6, HSDP2 3.0e-7.
TOLERANCE = 1e-4
MODES = {
    "tp2": {"tensor_parallel_size": 2},
    "ulysses2": {"ulysses_degree": 2},
    "ring2": {"ring_degree": 2},
    "cfg2": {"cfg_parallel_size": 2},
    "hsdp2": {"use_hsdp": True, "hsdp_shard_size": 2},
}
PROMPTS = [{"prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 1},
           {"prompt": "a blue car", "negative_prompt": "dark", "seed": 2}]
PARAMS = OmniDiffusionSamplingParams(num_inference_steps=4, height=32, width=48, guidance_scale=4.0,
                                     max_sequence_length=16, output_type="pt")
CACHES = {
    "cache_dit": ({"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 1,
                   "max_continuous_cached_steps": -1, "residual_diff_threshold": 0.9},
                  {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.0}),
    "tea_cache": ({"rel_l1_thresh": 1000.0}, {"rel_l1_thresh": 0.0}),
}


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(checkpoint path, {file name: line count}) of the doc's example, registered with the engine."""
    folder = tmp_path_factory.mktemp("doc_example")
    files = {name: code for name, code in BLOCK.findall(DOC.read_text())}
    assert set(files) == {"mini_dit.py", "pipeline_mini_dit.py", "build_tiny_mini_dit.py"}
    for name, code in files.items():
        (folder / name).write_text(code)
    sys.path.insert(0, str(folder))  # spawned workers inherit sys.path
    register_model("MiniDiTPipeline", "pipeline_mini_dit:MiniDiTPipeline")
    from build_tiny_mini_dit import build_tiny_mini_dit

    path = build_tiny_mini_dit(str(folder / "checkpoint"))
    yield path, {name: len(code.splitlines()) for name, code in files.items()}
    sys.path.remove(str(folder))


def _generate(path, **kwargs):
    with Omni(path, dtype="float32", device="cpu", disable_progress_bar=True, **kwargs) as omni:
        outputs = omni.generate(PROMPTS, PARAMS)
    return torch.cat([out.images for out in outputs]), outputs[0].metrics


@pytest.fixture(scope="module")
def one_process(example):
    return _generate(example[0])[0]


def test_the_model_and_pipeline_are_short(example):
    _, lines = example
    assert lines["mini_dit.py"] + lines["pipeline_mini_dit.py"] <= 250


def test_eager_run_draws_and_batches_exactly(example, one_process):
    assert one_process.shape == (2, 3, 32, 48) and one_process.std() > 0.05
    with Omni(example[0], dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        alone = torch.cat([omni.generate(p, PARAMS)[0].images for p in PROMPTS])
    assert (alone - one_process).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", list(MODES))
def test_parallel_mode_equals_one_process(example, one_process, mode):
    actual, _ = _generate(example[0], **MODES[mode])
    assert (actual - one_process).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("backend", list(CACHES))
def test_step_caches_skip_and_never_skip_is_exact(example, one_process, backend):
    permissive, never = CACHES[backend]
    cached, metrics = _generate(example[0], cache_backend=backend, cache_config=permissive)
    assert metrics["cached_steps"] > 0
    assert ((cached - one_process).norm() / one_process.norm()).item() <= 0.2
    exact, metrics = _generate(example[0], cache_backend=backend, cache_config=never)
    assert metrics["cached_steps"] == 0 and torch.equal(exact, one_process)
