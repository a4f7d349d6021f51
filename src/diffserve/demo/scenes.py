"""The demo model's world: procedurally generated scenes of coloured shapes on white, with captions.

One module owns the grammar, so the training data, the held-out split, the tokenizer and the detector
that scores generated images all agree on it:

    a red circle above a blue square on a white background
    a green triangle to the left of a yellow circle
    a purple square

Layouts are sampled with numpy (seeded, on the CPU) and rendered with torch on any device, anti-aliased
by clamping signed distances, so the GPU renders a training batch in well under a millisecond.

A two-object scene is identified by its *layout key* (axis, first object, second object): "a red
circle above a blue square" and "a blue square below a red circle" are the same picture. Some keys are
held out of training (never drawn by `sample_scenes` with `exclude_held_out=True`), and the quality
test asks the trained model for exactly those unseen combinations.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

# name -> sRGB. Far apart from each other and from white, so a nearest-colour test separates them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (150, 60, 190),
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle")
# relation -> phrasings used in captions (all are trained; the first is canonical).
RELATIONS: dict[str, tuple[str, ...]] = {
    "above": ("above",),
    "below": ("below",),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
BACKGROUND_SUFFIX = "on a white background"

PAD, UNK, BOS = "[PAD]", "[UNK]", "[BOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS)
WORDS = ("a", "above", "below", "to", "the", "left", "right", "of", "on", "white", "background")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + WORDS + tuple(COLORS) + SHAPES
MAX_TEXT_LENGTH = 16

IMAGE_SIZE = 64
# Half extent of a shape in pixels, at IMAGE_SIZE; scaled with the image.
MIN_HALF_SIZE, MAX_HALF_SIZE = 6.0, 11.0
SQUARE_SCALE = 0.9  # half side = 0.9 s: about the area of the circle of radius s
TRIANGLE_HALF_WIDTH = 1.15  # upright triangle: half base 1.15 s, height 2 s
GAP = 3.0  # pixels between two shapes' extents along the relation's axis
SECONDARY_SPREAD = 0.6  # |offset across the axis| <= 0.6 x distance along it: the relation stays clear

# Layout keys held out of training: 20 for choosing sampling defaults, 20 for the quality test.
HELD_OUT_PER_SPLIT = 20
HELD_OUT_SEED = 20260
# The README's first command draws this one: keep it in the training set.
DEMO_CAPTION = "a red circle above a blue square"


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str

    def __str__(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: one object, or two with `relation` (objects[0] `relation` objects[1])."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def text(self, phrasing: int = 0, background: bool = False) -> str:
        first = f"a {self.objects[0]}"
        if self.relation is None:
            words = first
        else:
            words = f"{first} {RELATIONS[self.relation][phrasing]} a {self.objects[1]}"
        return f"{words} {BACKGROUND_SUFFIX}" if background else words


# A layout key: (axis, first object, second object), first = top (axis "v") or left (axis "h").
LayoutKey = tuple[str, ObjectSpec, ObjectSpec]


def layout_key(spec: CaptionSpec) -> LayoutKey | None:
    if spec.relation is None:
        return None
    a, b = spec.objects
    return {
        "above": ("v", a, b),
        "below": ("v", b, a),
        "left of": ("h", a, b),
        "right of": ("h", b, a),
    }[spec.relation]


def _normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z]+", " ", text.lower()).split()


_OBJECT = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_RELATION = "|".join(p for phrasings in RELATIONS.values() for p in phrasings)
_CAPTION_RE = re.compile(rf"^{_OBJECT}(?: ({_RELATION}) {_OBJECT})?(?: {BACKGROUND_SUFFIX})?$")


def parse_caption(text: str) -> CaptionSpec:
    """The inverse of CaptionSpec.text; a ValueError for anything outside the grammar."""
    words = " ".join(_normalize(text))
    match = _CAPTION_RE.match(words)
    if not match:
        raise ValueError(
            f"caption {text!r} is outside the demo grammar: 'a COLOUR SHAPE [RELATION a COLOUR SHAPE] "
            f"[{BACKGROUND_SUFFIX}]' with COLOUR in {list(COLORS)}, SHAPE in {list(SHAPES)} and RELATION in "
            f"{[p for ps in RELATIONS.values() for p in ps]}"
        )
    c1, s1, phrase, c2, s2 = match.groups()
    if phrase is None:
        return CaptionSpec((ObjectSpec(c1, s1),))
    relation = next(r for r, phrasings in RELATIONS.items() if phrase in phrasings)
    if c1 == c2:
        raise ValueError(f"caption {text!r} names one colour twice; the demo grammar needs two different colours")
    return CaptionSpec((ObjectSpec(c1, s1), ObjectSpec(c2, s2)), relation)


# -- the held-out split ------------------------------------------------------------------------------


def all_layout_keys() -> list[LayoutKey]:
    objects = [ObjectSpec(c, s) for c in COLORS for s in SHAPES]
    return [(axis, a, b) for axis in ("v", "h") for a in objects for b in objects if a.color != b.color]


@functools.lru_cache(maxsize=None)
def held_out_keys() -> dict[str, tuple[LayoutKey, ...]]:
    """{"validation": keys, "test": keys}: disjoint, half vertical and half horizontal, fixed by a seed."""
    demo_key = layout_key(parse_caption(DEMO_CAPTION))
    rng = np.random.default_rng(HELD_OUT_SEED)
    split: dict[str, list[LayoutKey]] = {"validation": [], "test": []}
    for axis in ("v", "h"):
        keys = [k for k in all_layout_keys() if k[0] == axis and k != demo_key]
        order = rng.permutation(len(keys))
        half = HELD_OUT_PER_SPLIT // 2
        split["validation"] += [keys[i] for i in order[:half]]
        split["test"] += [keys[i] for i in order[half : 2 * half]]
    return {name: tuple(keys) for name, keys in split.items()}


def held_out_key_set() -> frozenset[LayoutKey]:
    return frozenset(k for keys in held_out_keys().values() for k in keys)


def held_out_captions(split: str) -> list[str]:
    """One caption per held-out key of `split`, cycling through the relations' phrasings."""
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    captions = []
    for i, (axis, first, second) in enumerate(held_out_keys()[split]):
        forward = i % 2 == 0  # "first above/left of second", else "second below/right of first"
        if axis == "v":
            spec = CaptionSpec((first, second), "above") if forward else CaptionSpec((second, first), "below")
        else:
            spec = CaptionSpec((first, second), "left of") if forward else CaptionSpec((second, first), "right of")
        phrasing = (i // 2) % len(RELATIONS[spec.relation])
        captions.append(spec.text(phrasing=phrasing, background=i % 4 == 3))
    return captions


def seen_captions(count: int, seed: int = 0) -> list[str]:
    """`count` two-object captions whose layouts are in the training set, drawn reproducibly."""
    rng = np.random.default_rng(seed)
    held = held_out_key_set()
    keys = [k for k in all_layout_keys() if k not in held]
    return [
        CaptionSpec((k[1], k[2]), "above" if k[0] == "v" else "left of").text()
        for k in (keys[i] for i in rng.choice(len(keys), size=count, replace=False))
    ]


# -- layouts -----------------------------------------------------------------------------------------


@dataclass
class SceneBatch:
    """Up to two objects per scene. Arrays are [B, 2]; the second object of a one-object scene has
    shape index -1. `centers` [B, 2, 2] is (x, y) in pixels, y growing downwards."""

    captions: list[str]
    specs: list[CaptionSpec]
    color_index: np.ndarray
    shape_index: np.ndarray
    half_size: np.ndarray
    centers: np.ndarray
    image_size: int

    def __len__(self) -> int:
        return len(self.captions)


def _extent(shape_index: np.ndarray, half_size: np.ndarray) -> np.ndarray:
    """Half extent of each shape's bounding box (the widest of its two half extents)."""
    scale = np.select([shape_index == 1, shape_index == 2], [SQUARE_SCALE, TRIANGLE_HALF_WIDTH], 1.0)
    return half_size * scale


def _place_pair(rng: np.random.Generator, ext_first: np.ndarray, ext_second: np.ndarray, size: int) -> np.ndarray:
    """Centres [n, 2, 2] of two shapes, the first before the second along the primary axis (index 0
    of the last dim here; the caller swaps x/y for vertical layouts), non-overlapping."""
    n = len(ext_first)
    lo0, hi0 = ext_first + 1, size - 1 - ext_first
    lo1, hi1 = ext_second + 1, size - 1 - ext_second
    d_min = ext_first + ext_second + GAP
    d_max = hi1 - lo0
    d = rng.uniform(d_min, d_max)
    p0 = rng.uniform(lo0, hi1 - d)
    p1 = p0 + d
    s0 = rng.uniform(lo0, hi0)
    s1 = np.clip(s0 + rng.uniform(-SECONDARY_SPREAD, SECONDARY_SPREAD, n) * d, lo1, hi1)
    return np.stack([np.stack([p0, s0], -1), np.stack([p1, s1], -1)], axis=1)


def _layout(rng: np.random.Generator, specs: list[CaptionSpec], size: int) -> SceneBatch:
    n = len(specs)
    color_names, shape_names = list(COLORS), list(SHAPES)
    color_index = np.zeros((n, 2), dtype=np.int64)
    shape_index = np.full((n, 2), -1, dtype=np.int64)
    for i, spec in enumerate(specs):
        for j, obj in enumerate(spec.objects):
            color_index[i, j] = color_names.index(obj.color)
            shape_index[i, j] = shape_names.index(obj.shape)
    scale = size / IMAGE_SIZE
    half_size = rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE, (n, 2)) * scale
    ext = _extent(shape_index, half_size)
    centers = np.zeros((n, 2, 2))
    single = shape_index[:, 1] < 0
    centers[single, 0] = rng.uniform(ext[single, 0:1] + 1, size - 1 - ext[single, 0:1], (int(single.sum()), 2))
    # Order the pair along its axis: first = top or left.
    relation = np.array([s.relation or "" for s in specs])
    swap = (relation == "below") | (relation == "right of")
    vertical = (relation == "above") | (relation == "below")
    pair = ~single
    if pair.any():
        first = np.where(swap, 1, 0)[pair]
        rows = np.arange(n)[pair]
        placed = _place_pair(rng, ext[rows, first], ext[rows, 1 - first], size)  # (primary, secondary)
        placed = np.where(vertical[pair][:, None, None], placed[..., ::-1], placed)  # -> (x, y)
        centers[rows, first] = placed[:, 0]
        centers[rows, 1 - first] = placed[:, 1]
    return SceneBatch([], specs, color_index, shape_index, half_size, centers, size)


def sample_specs(
    rng: np.random.Generator, n: int, p_single: float = 0.2, exclude: frozenset = frozenset()
) -> list[CaptionSpec]:
    """Random caption specs: one object with probability p_single, else two of different colours."""
    colors, shapes, relations = list(COLORS), list(SHAPES), list(RELATIONS)
    specs: list[CaptionSpec] = []
    while len(specs) < n:
        if rng.random() < p_single:
            obj = ObjectSpec(colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))])
            specs.append(CaptionSpec((obj,)))
            continue
        c1, c2 = rng.choice(len(colors), size=2, replace=False)
        a = ObjectSpec(colors[c1], shapes[rng.integers(len(shapes))])
        b = ObjectSpec(colors[c2], shapes[rng.integers(len(shapes))])
        spec = CaptionSpec((a, b), relations[rng.integers(len(relations))])
        if layout_key(spec) not in exclude:
            specs.append(spec)
    return specs


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    image_size: int = IMAGE_SIZE,
    p_single: float = 0.2,
    exclude_held_out: bool = True,
) -> SceneBatch:
    """`n` random scenes with captions (random phrasing, background suffix half of the time)."""
    specs = sample_specs(rng, n, p_single, held_out_key_set() if exclude_held_out else frozenset())
    batch = _layout(rng, specs, image_size)
    phrasing = rng.integers(0, 2, n)
    background = rng.random(n) < 0.5
    batch.captions = [
        s.text(phrasing=int(p) % len(RELATIONS[s.relation]) if s.relation else 0, background=bool(bg))
        for s, p, bg in zip(specs, phrasing, background)
    ]
    return batch


def scenes_for_captions(rng: np.random.Generator, captions: Iterable[str], image_size: int = IMAGE_SIZE) -> SceneBatch:
    """A random layout matching each caption (the ground truth a perfect model would draw)."""
    captions = list(captions)
    batch = _layout(rng, [parse_caption(c) for c in captions], image_size)
    batch.captions = captions
    return batch


# -- rendering ---------------------------------------------------------------------------------------


def scene_arrays(batch: SceneBatch) -> dict[str, np.ndarray]:
    """What the renderer needs, as arrays: colour [B, 2, 3] in [0, 1], shape index [B, 2] (-1 = none),
    half size [B, 2] and centres [B, 2, 2] in pixels."""
    palette = np.array(list(COLORS.values()), dtype=np.float32) / 255
    return {
        "color": palette[batch.color_index],
        "shape_index": batch.shape_index,
        "half_size": batch.half_size.astype(np.float32),
        "centers": batch.centers.astype(np.float32),
    }


def render(arrays: dict, image_size: int):
    """Float images [B, 3, H, W] in [0, 1] from `scene_arrays` as torch tensors (on any one device),
    anti-aliased by clamping each pixel's signed distance to the shape."""
    import torch

    color, shape_index, half, centers = (arrays[k] for k in ("color", "shape_index", "half_size", "centers"))
    device = centers.device
    coords = torch.arange(image_size, device=device, dtype=torch.float32) + 0.5
    ys, xs = coords[:, None], coords[None, :]
    image = torch.ones(len(centers), 3, image_size, image_size, device=device)
    for j in range(2):
        s = half[:, j, None, None]
        dx = xs - centers[:, j, 0, None, None]
        dy = ys - centers[:, j, 1, None, None]
        circle = torch.sqrt(dx**2 + dy**2) - s
        square = torch.maximum(dx.abs(), dy.abs()) - SQUARE_SCALE * s
        w, h = TRIANGLE_HALF_WIDTH * s, 2 * s
        side = (dx.abs() * h - (dy + s) * w) / torch.sqrt(h**2 + w**2)
        triangle = torch.maximum(side, dy - s)
        kind = shape_index[:, j, None, None]
        distance = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
        alpha = ((0.5 - distance).clamp(0, 1) * (kind >= 0))[:, None]
        image = image * (1 - alpha) + color[:, j, :, None, None] * alpha
    return image


def render_scenes(batch: SceneBatch, device="cpu"):
    """Float images [B, 3, H, W] in [0, 1] (torch, on `device`)."""
    import torch

    arrays = {k: torch.as_tensor(v, device=device) for k, v in scene_arrays(batch).items()}
    return render(arrays, batch.image_size)


def to_uint8(images) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> uint8 [B, H, W, 3]."""
    import torch

    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# -- the tokenizer -----------------------------------------------------------------------------------


def build_tokenizer():
    """A word-level tokenizer over VOCAB (tokenizers library): lower-cases, drops punctuation, prepends
    [BOS] (so the empty prompt is [BOS] then padding), unknown words become [UNK]. Padding and
    truncation are the caller's (`tokenize`)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z]+"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return tokenizer


def save_tokenizer(folder: str, max_length: int = MAX_TEXT_LENGTH) -> None:
    """tokenizer.json + tokenizer_config.json, loadable with transformers' PreTrainedTokenizerFast (or
    AutoTokenizer) without transformers being needed to write them."""
    os.makedirs(folder, exist_ok=True)
    build_tokenizer().save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "pad_token": PAD,
        "unk_token": UNK,
        "bos_token": BOS,
        "padding_side": "right",
        "truncation_side": "right",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
