"""Model conformance: every registered architecture, built tiny, loaded through the registry, equals
the diffusers pipeline on the same weights and seeds (fp32, CPU).

Measured max-abs differences (2026-11-26): 0.0 for every FLUX scenario; tolerance 1e-4 per case;
Wan (video): 0.0 to 4.5e-6, SD3 / SD3.5 0.0 (skip-layer guidance included); Qwen-Image and its edit
models (2026-11-30): 4.5e-6 to 1.0e-5; each noted per case in diffserve/testing/conformance.py.
Pipelines served through the diffusers adapter (PixArt-Sigma, LTX-Video, AudioLDM2; 2026-11-30) equal
diffusers called directly: 0.0 to 1.2e-7.
"""

import pytest
import torch

from diffserve import Omni
from diffserve.registry import read_model_index, supported_models
from diffserve.testing import CONFORMANCE_CASES, output_tensor

SCENARIOS = [(case, scenario) for case in CONFORMANCE_CASES for scenario in case.scenarios]


def _user_prompts(scenario):
    prompts = []
    for prompt, seed in zip(scenario.prompts, scenario.seeds):
        prompt = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
        prompts.append({**prompt, "seed": seed})
    return prompts


@pytest.mark.parametrize(
    "case, scenario", SCENARIOS, ids=[f"{c.arch}-{s.name}" for c, s in SCENARIOS]
)
def test_pipeline_matches_diffusers(tiny_checkpoint, case, scenario):
    path = tiny_checkpoint(case.arch)
    with Omni(path, dtype="float32", device="cpu", max_batch_size=len(scenario.prompts)) as omni:
        outputs = omni.generate(_user_prompts(scenario), scenario.params)
    assert all(out.metrics["batch_size"] == len(scenario.prompts) for out in outputs)
    # Video pipelines return frames, image pipelines images, audio pipelines waveforms; all float tensors
    # for output_type='pt'.
    ours = torch.cat([output_tensor(out) for out in outputs])
    reference = case.run_reference(path, scenario)
    assert ours.shape == reference.shape
    assert ours.std() > 0.05  # a real image, video or sound, not a constant
    assert (ours - reference).abs().max().item() <= case.tolerance


def test_every_registered_pipeline_has_a_conformance_case(tiny_checkpoint):
    covered = {read_model_index(tiny_checkpoint(case.arch))["_class_name"] for case in CONFORMANCE_CASES
               if case.backend == "native"}
    assert covered == set(supported_models())


def test_adapter_cases_are_pipelines_diffserve_does_not_port(tiny_checkpoint):
    """The diffusers-adapter cases reach the adapter by the fallback, not by backend='diffusers'."""
    adapted = {read_model_index(tiny_checkpoint(case.arch))["_class_name"] for case in CONFORMANCE_CASES
               if case.backend == "diffusers"}
    assert adapted == {"PixArtSigmaPipeline", "LTXPipeline", "AudioLDM2Pipeline"}
    assert not adapted & set(supported_models())
