"""The denoise loop on a CUDA device: no host syncs in any family, and CUDA graphs through the engine.

A host sync (a `.item()`, `nonzero`, a device-to-host copy, ...) stops the host until the GPU drains,
so the next step's kernels start late. `torch.cuda.set_sync_debug_mode("error")` turns every such call
into an error; it is on from the end of the first step to the end of the last (the first step may
allocate and look things up once), through the engine's own progress callback. Tiny random-weight
checkpoints (`diffserve.testing`), bf16, eager, one request each after a warm-up request.
"""

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.assets import DEMO_MODEL_DIR
from diffserve.request import OmniDiffusionRequest, PromptInput
from tests.models.test_host_syncs import FAMILIES as CPU_CHECKED_FAMILIES

pytestmark = pytest.mark.gpu

# The CPU check's text-to-X families (CFG on in each), and Stable Audio, which only this one covers.
FAMILIES = {**CPU_CHECKED_FAMILIES, "stable-audio": {"guidance_scale": 4.0}}


def _request(engine, prompt: str, params: OmniDiffusionSamplingParams) -> OmniDiffusionRequest:
    return engine.admit(OmniDiffusionRequest(prompts=[PromptInput.from_user(prompt, params)], sampling_params=params))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_host_sync_between_the_first_and_last_step(tiny_checkpoint, family):
    path = DEMO_MODEL_DIR if family == "demo" else tiny_checkpoint(family)
    params = OmniDiffusionSamplingParams(seed=0, **FAMILIES[family])
    steps_seen = []

    def watch_syncs(done: int, total: int) -> None:
        steps_seen.append(done)
        torch.cuda.set_sync_debug_mode("error" if done < total else "default")

    with Omni(path, device="cuda", dtype="bfloat16", enforce_eager=True, disable_progress_bar=True) as omni:
        engine = omni.engine
        assert engine.run_batch([_request(engine, "a red circle", params)])[0].error is None  # warm-up
        try:
            out = engine.run_batch([_request(engine, "a red circle", params)], watch_syncs)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.error is None, f"{family}: {out.error}"
    assert len(steps_seen) >= 2, f"{family}: the loop reported {steps_seen}; nothing was watched"


def test_cuda_graphs_through_the_engine_draw_the_same_pixels():
    prompts = [{"prompt": "a red circle above a blue square", "seed": 1},
               {"prompt": "a green triangle left of a yellow circle", "seed": 2}]
    params = OmniDiffusionSamplingParams(output_type="pt")

    def images(**config) -> list[torch.Tensor]:
        with Omni(DEMO_MODEL_DIR, device="cuda", dtype="bfloat16", disable_progress_bar=True, **config) as omni:
            # Twice: a signature is recorded at its second call, so the second round replays graphs.
            return [out.images.cpu() for _ in range(2) for out in omni.generate(prompts, params)]

    plain, graphed = images(), images(cuda_graphs=True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b)
