"""The shipped demo model draws what held-out captions ask for.

Held-out captions name layouts (colour x shape x colour x shape x axis) the model never saw in
training (scenes.held_out_captions("test")). The detector (validated on clean renders in
test_detector.py) must find the caption in at least 80% of the images at the model's default settings, for each of
two seeds per caption. The default run draws the first 10 of the 20 captions with the first seed;
the slow tier draws all of them with both.
"""

import pytest

import os

from diffserve.assets import DEMO_MODEL_DIR

# Skipped only while the folder does not exist: a folder that is there but incomplete fails.
pytestmark = pytest.mark.skipif(
    not os.path.isdir(DEMO_MODEL_DIR),
    reason=f"the built-in demo model is not trained yet ({DEMO_MODEL_DIR} is absent); "
    "run scripts/train_demo_model.py on a GPU and copy its --out folder there",
)

SEEDS = (0, 1)  # scripts/train_demo_model.py reports the accuracy on exactly these (QUALITY_TEST_SEEDS)
THRESHOLD = 0.8


@pytest.mark.parametrize("seed, count", [(SEEDS[0], 10), pytest.param(SEEDS[0], None, marks=pytest.mark.slow),
                                         pytest.param(SEEDS[1], None, marks=pytest.mark.slow)])
def test_held_out_captions_are_drawn_correctly(seed, count):
    import numpy as np

    from diffserve import Omni
    from diffserve.demo import detector, scenes

    captions = scenes.held_out_captions("test")[:count]
    prompts = [{"prompt": c, "seed": seed} for c in captions]
    with Omni(DEMO_MODEL_DIR, dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        outputs = omni.generate(prompts)
    images = np.stack([np.asarray(o.images[0]) for o in outputs])  # uint8 [N, 64, 64, 3]
    score, verdicts = detector.score_images(images, [p["prompt"] for p in prompts])
    failures = [(p["prompt"], p["seed"], v.reason) for p, v in zip(prompts, verdicts) if not v.ok]
    assert score >= THRESHOLD, f"{score:.0%} of {len(prompts)} images show their caption; failures: {failures}"
