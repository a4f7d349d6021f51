"""The demo world: caption grammar, held-out split, layouts and the tokenizer agree with each other."""

import numpy as np
import pytest
import torch

from diffserve.demo import scenes
from diffserve.demo.scenes import CaptionSpec, ObjectSpec
from diffserve.models.demo_dit import captions


def test_every_phrasing_parses_back():
    a, b = ObjectSpec("red", "circle"), ObjectSpec("blue", "square")
    for relation, phrasings in scenes.RELATIONS.items():
        spec = CaptionSpec((a, b), relation)
        for i in range(len(phrasings)):
            for background in (False, True):
                assert scenes.parse_caption(spec.text(i, background)) == spec
    assert scenes.parse_caption("A Red circle, on a white background.") == CaptionSpec((a,))


@pytest.mark.parametrize(
    "caption", ["a red dog", "a red circle near a blue square", "a red circle above a red square", ""]
)
def test_captions_outside_the_grammar_are_errors(caption):
    with pytest.raises(ValueError, match="caption"):
        scenes.parse_caption(caption)


def test_held_out_split_is_fixed_disjoint_and_keeps_the_demo_caption():
    keys = scenes.held_out_keys()
    assert len(keys["validation"]) == len(keys["test"]) == 20
    assert not set(keys["validation"]) & set(keys["test"])
    assert scenes.layout_key(scenes.parse_caption(scenes.DEMO_CAPTION)) not in scenes.held_out_key_set()
    test = scenes.held_out_captions("test")
    assert len(set(test)) == 20
    assert {scenes.layout_key(scenes.parse_caption(c)) for c in test} == set(keys["test"])
    assert scenes.held_out_captions("test") == test  # deterministic
    assert (
        not {scenes.layout_key(scenes.parse_caption(c)) for c in scenes.seen_captions(20)} & scenes.held_out_key_set()
    )


def test_training_scenes_never_show_a_held_out_layout():
    batch = scenes.sample_scenes(np.random.default_rng(0), 5000)
    keys = {scenes.layout_key(s) for s in batch.specs}
    assert not keys & scenes.held_out_key_set()
    assert len(keys - {None}) > 300  # but nearly every other layout (320 of them) appears
    singles = sum(s.relation is None for s in batch.specs) / len(batch)
    assert 0.15 < singles < 0.25


def test_layouts_fit_the_image_do_not_overlap_and_match_the_caption():
    batch = scenes.sample_scenes(np.random.default_rng(1), 2000)
    ext = scenes._extent(batch.shape_index, batch.half_size)
    for i, spec in enumerate(batch.specs):
        for j in range(len(spec.objects)):
            assert np.all(batch.centers[i, j] - ext[i, j] >= 0) and np.all(batch.centers[i, j] + ext[i, j] <= 64)
        if spec.relation is None:
            continue
        (x1, y1), (x2, y2) = batch.centers[i]
        axis_gap = {"above": y2 - y1, "below": y1 - y2, "left of": x2 - x1, "right of": x1 - x2}[spec.relation]
        assert axis_gap >= ext[i].sum() + scenes.GAP - 1e-6, (spec, batch.centers[i])


def test_sampling_is_reproducible():
    a = scenes.sample_scenes(np.random.default_rng(3), 64)
    b = scenes.sample_scenes(np.random.default_rng(3), 64)
    assert a.captions == b.captions and np.array_equal(a.centers, b.centers)
    assert torch.equal(scenes.render_scenes(a), scenes.render_scenes(b))


def test_renders_are_white_with_palette_shapes():
    images = scenes.render_scenes(scenes.sample_scenes(np.random.default_rng(2), 16))
    assert images.shape == (16, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert (images[:, :, 0, 0] == 1).float().mean() > 0.8  # corners are background, mostly


def test_saved_tokenizer_loads_with_transformers_and_matches_the_grammar(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    scenes.save_tokenizer(str(tmp_path))
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert type(AutoTokenizer.from_pretrained(str(tmp_path))) is type(tok)
    vocab = {w: i for i, w in enumerate(scenes.VOCAB)}
    ids = captions.tokenize(tok, ["A red circle, to the LEFT of a blue square!", "", "a pink circle"], 16)
    assert ids.shape == (3, 16)
    words = "a red circle to the left of a blue square".split()
    assert ids[0, : len(words) + 1].tolist() == [vocab["[BOS]"]] + [vocab[w] for w in words]
    assert ids[0, len(words) + 1 :].eq(vocab["[PAD]"]).all()
    assert ids[1].tolist() == [vocab["[BOS]"]] + [vocab["[PAD]"]] * 15
    assert ids[2, 2].item() == vocab["[UNK]"]
    longest = CaptionSpec((ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), "right of").text(0, True)
    assert len(tok(longest).input_ids) <= scenes.MAX_TEXT_LENGTH
