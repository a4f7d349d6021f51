"""The model conformance suite's table: per architecture, scenarios and how to run the reference.

A new model joins the suite by adding a ConformanceCase here (and a tiny builder in __init__); the
test in tests/models/test_conformance.py runs every case through the registry and compares with the
diffusers pipeline on the same weights and seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffserve.request import OmniDiffusionSamplingParams


@dataclass(frozen=True)
class ConformanceScenario:
    name: str
    prompts: list[Any]
    params: OmniDiffusionSamplingParams
    # Per prompt; the reference gets one CPU generator per seed.
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass(frozen=True)
class ConformanceCase:
    arch: str
    scenarios: list[ConformanceScenario]
    # (checkpoint path, scenario) -> reference float images [N, C, H, W] in [0, 1]
    run_reference: Callable[[str, ConformanceScenario], torch.Tensor]
    # max |ours - reference| on the float output, fp32 on CPU
    tolerance: float = 1e-4
    # The scenario the parallel tests (TP, CFG, HSDP vs one process) run; it should use CFG.
    # None: the first scenario.
    parallel_scenario: str | None = None

    def scenario(self, name: str | None) -> ConformanceScenario:
        if name is None:
            return self.scenarios[0]
        return next(s for s in self.scenarios if s.name == name)


def _generators(scenario: ConformanceScenario):
    gens = [torch.Generator("cpu").manual_seed(s) for s in scenario.seeds]
    return gens[0] if len(gens) == 1 else gens


def run_flux_reference(path: str, scenario: ConformanceScenario) -> torch.Tensor:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sp = scenario.params
    negatives = [p.get("negative_prompt") for p in scenario.prompts if isinstance(p, dict)]
    prompts = [p["prompt"] if isinstance(p, dict) else p for p in scenario.prompts]
    kwargs = {}
    if sp.guidance_scale is not None:
        kwargs["guidance_scale"] = sp.guidance_scale
    return pipe(
        prompt=prompts,
        negative_prompt=negatives or None,
        true_cfg_scale=sp.true_cfg_scale,
        height=sp.height,
        width=sp.width,
        num_inference_steps=sp.num_inference_steps,
        num_images_per_prompt=sp.num_outputs_per_prompt,
        max_sequence_length=sp.max_sequence_length,
        generator=_generators(scenario),
        output_type="pt",
        **kwargs,
    ).images


def _flux_scenarios(guidance: float | None) -> list[ConformanceScenario]:
    def params(**kw):
        return OmniDiffusionSamplingParams(
            num_inference_steps=3, max_sequence_length=16, guidance_scale=guidance, output_type="pt", **kw
        )

    return [
        ConformanceScenario(
            "batch2_nonsquare", ["a red fox in snow", "a blue car"], params(height=32, width=48), seeds=[0, 1]
        ),
        ConformanceScenario(
            "true_cfg_batch2",
            [
                {"prompt": "a red fox in snow", "negative_prompt": "blurry"},
                {"prompt": "a blue car", "negative_prompt": "low quality"},
            ],
            params(height=48, width=32, true_cfg_scale=4.0),
            seeds=[3, 4],
        ),
        ConformanceScenario(
            "two_outputs_per_prompt", ["a castle"], params(height=32, width=32, num_outputs_per_prompt=2), seeds=[7]
        ),
    ]


CONFORMANCE_CASES: list[ConformanceCase] = [
    ConformanceCase("flux", _flux_scenarios(guidance=3.5), run_flux_reference, parallel_scenario="true_cfg_batch2"),
    ConformanceCase("flux-schnell", _flux_scenarios(guidance=None), run_flux_reference),
]
