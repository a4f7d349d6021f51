"""The detector the quality test trusts finds every caption in the generator's own clean renders, and
rejects pictures that contradict their caption."""

import numpy as np
import pytest

from diffserve.demo import detector, scenes
from diffserve.demo.scenes import CaptionSpec, ObjectSpec

SWAP = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


@pytest.fixture(scope="module")
def clean():
    batch = scenes.sample_scenes(np.random.default_rng(11), 600, exclude_held_out=False)
    return batch, scenes.to_uint8(scenes.render_scenes(batch))


def test_finds_every_caption_in_clean_renders(clean):
    batch, images = clean
    score, verdicts = detector.score_images(images, batch.captions)
    failures = [(c, v.reason) for c, v in zip(batch.captions, verdicts) if not v.ok]
    assert score == 1.0, failures[:5]


def test_finds_every_held_out_caption_in_clean_renders():
    captions = scenes.held_out_captions("test") + scenes.held_out_captions("validation")
    batch = scenes.scenes_for_captions(np.random.default_rng(5), captions * 5)
    assert detector.score_images(scenes.to_uint8(scenes.render_scenes(batch)), batch.captions)[0] == 1.0


def test_rejects_swapped_relations(clean):
    batch, images = clean
    pairs = [(img, s) for img, s in zip(images, batch.specs) if s.relation]
    accepted = [detector.check_image(img, CaptionSpec(s.objects, SWAP[s.relation])).ok for img, s in pairs]
    assert len(pairs) > 400 and not any(accepted)


def test_rejects_wrong_shape_and_wrong_colour(clean):
    batch, images = clean
    for img, spec in list(zip(images, batch.specs))[:200]:
        first = spec.objects[0]
        other_shape = next(s for s in scenes.SHAPES if s != first.shape)
        verdict = detector.check_image(
            img, CaptionSpec((ObjectSpec(first.color, other_shape), *spec.objects[1:]), spec.relation)
        )
        assert not verdict.ok and f"not a {other_shape}" in verdict.reason
        used = {o.color for o in spec.objects}
        absent = next(c for c in scenes.COLORS if c not in used)
        verdict = detector.check_image(
            img, CaptionSpec((ObjectSpec(absent, first.shape), *spec.objects[1:]), spec.relation)
        )
        assert not verdict.ok and verdict.reason == f"no {absent} shape"


def test_blank_and_noise_images_fail():
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert detector.check_image(blank, "a red circle").reason == "no red shape"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not detector.check_image(noise, "a red circle above a blue square").ok


def test_shape_statistics_sit_inside_the_thresholds(clean):
    """Margins of the shape rule on clean renders (fill = blob area / bounding-box area)."""
    batch, images = clean
    fills = {s: [] for s in scenes.SHAPES}
    for img, spec in zip(images, batch.specs):
        labels = detector.classify_pixels(img)
        for obj in spec.objects:
            fills[obj.shape].append(detector.find_blob(labels, obj.color).fill)
    assert min(fills["square"]) > detector.SQUARE_FILL
    assert max(fills["circle"]) < detector.SQUARE_FILL and min(fills["circle"]) > detector.TRIANGLE_FILL
    assert max(fills["triangle"]) < detector.TRIANGLE_FILL + 0.01
