"""How the demo model reads a prompt: one phrasing per scene, then word-level tokens.

Shared by the shipped pipeline and the training code (diffserve.demo), so both feed the text encoder
the same ids. No torch here beyond what the tokenizer returns.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

_OBJECT = r"(a (?:\w+) (?:\w+))"
_INVERSE_RELATION = re.compile(
    rf"^{_OBJECT} (below|to the right of|right of) {_OBJECT}( on a white background)?$"
)
_CANONICAL = {"below": "above", "to the right of": "to the left of", "right of": "left of"}


def normalize_caption(caption: str) -> str:
    """Say a two-object scene one way: "X below Y" -> "Y above X", "X right of Y" -> "Y left of X".

    The two sentences describe the same picture, but the small text encoder trained with the model
    does not learn to swap which object comes first (a training run with both phrasings placed the
    objects at random along the right axis). With one phrasing, "the first object is the upper or
    left one" is a fixed position lookup. Anything else passes through unchanged.
    """
    text = " ".join(caption.lower().split())
    match = _INVERSE_RELATION.match(text)
    if match is None:
        return caption
    first, relation, second, background = match.groups()
    return f"{second} {_CANONICAL[relation]} {first}{background or ''}"


def tokenize(tokenizer, prompts: list[str], max_length: int):
    """Token ids [B, max_length] (torch.long) of the normalized captions, as training and the pipeline
    both feed the text encoder."""
    prompts = [normalize_caption(p) for p in prompts]
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return ids.input_ids


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words of `prompt` the tokenizer's vocabulary lacks (they become [UNK] and say nothing)."""
    words = tokenizer.backend_tokenizer.normalizer.normalize_str(prompt).split()
    vocab = tokenizer.get_vocab()
    return [w for w in words if w not in vocab]
