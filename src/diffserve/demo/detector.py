"""Does a picture show what its caption asks for? A simple detector for the demo model's world.

For each colour the caption names: the pixels nearest to that palette colour (white is a colour too,
so the background and faint anti-aliasing fall away), their largest 4-connected blob, and its shape
from how it fills its bounding box (square ~1, circle ~pi/4, upright triangle ~1/2; a circle/triangle
tie is broken by comparing the blob's width near its top and bottom). Relations compare blob
centroids (y grows downwards). No learning, no dependencies beyond numpy.

On the generator's own clean renders it finds every caption (tests/models/demo_dit/test_detector.py);
the quality test then applies it to the trained model's pictures of held-out captions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from diffserve.demo.scenes import BACKGROUND, COLORS, CaptionSpec, parse_caption

_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # index 0 = white
_COLOR_INDEX = {name: i + 1 for i, name in enumerate(COLORS)}

# Smallest blob that counts as a shape, as a fraction of the image (a shape of half size 6 at 64x64
# covers about 2.5%).
MIN_AREA_FRACTION = 0.006
SQUARE_FILL = 0.88  # fill of the bounding box at or above which a blob is a square
TRIANGLE_FILL = 0.62  # at or below which it is a triangle
TAPER_RATIO = 0.6  # width at 25% height / width at 75% height below which it is a triangle
RELATION_MARGIN = 1.0  # pixels the centroids must differ by along the relation's axis


@dataclass(frozen=True)
class Blob:
    color: str
    shape: str
    area: int
    centroid: tuple[float, float]  # (x, y)
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive
    fill: float


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    blobs: dict[str, Blob | None]


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """uint8/float [H, W, 3] in 0..255 -> palette index [H, W] (0 = white, i = i-th colour of COLORS)."""
    pixels = image.astype(np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """Coordinates [N, 2] (y, x) of the largest 4-connected True region, or None if there is none."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    return np.array(best) if best else None


def classify_shape(coords: np.ndarray) -> tuple[str, float]:
    """(shape name, fill ratio) of a blob given as (y, x) coordinates."""
    ys, xs = coords[:, 0], coords[:, 1]
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = len(coords) / float((y1 - y0 + 1) * (x1 - x0 + 1))
    if fill >= SQUARE_FILL:
        return "square", fill
    if fill <= TRIANGLE_FILL:
        return "triangle", fill
    height = y1 - y0 + 1

    def width_at(fraction: float) -> int:
        row = y0 + int(fraction * (height - 1) + 0.5)
        return int((ys == row).sum())

    taper = width_at(0.25) / max(width_at(0.75), 1)
    return ("triangle" if taper < TAPER_RATIO else "circle"), fill


def find_blob(labels: np.ndarray, color: str) -> Blob | None:
    """The largest blob of `color` in a palette-index map, or None if it is missing or too small."""
    mask = labels == _COLOR_INDEX[color]
    min_area = MIN_AREA_FRACTION * labels.size
    if mask.sum() < min_area:
        return None
    coords = largest_component(mask)
    if coords is None or len(coords) < min_area:
        return None
    shape, fill = classify_shape(coords)
    ys, xs = coords[:, 0], coords[:, 1]
    return Blob(
        color=color,
        shape=shape,
        area=len(coords),
        centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
        bbox=(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
        fill=fill,
    )


def relation_holds(relation: str, first: Blob, second: Blob, margin: float = RELATION_MARGIN) -> bool:
    (x1, y1), (x2, y2) = first.centroid, second.centroid
    return {
        "above": y1 < y2 - margin,
        "below": y1 > y2 + margin,
        "left of": x1 < x2 - margin,
        "right of": x1 > x2 + margin,
    }[relation]


def check_image(image: np.ndarray, caption: str | CaptionSpec) -> Verdict:
    """Whether `image` (uint8 [H, W, 3]) shows every object of `caption` with the right colour and shape,
    in the right relation."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    labels = classify_pixels(image)
    blobs = {obj.color: find_blob(labels, obj.color) for obj in spec.objects}
    for obj in spec.objects:
        blob = blobs[obj.color]
        if blob is None:
            return Verdict(False, f"no {obj.color} shape", blobs)
        if blob.shape != obj.shape:
            return Verdict(
                False, f"the {obj.color} shape is a {blob.shape} (fill {blob.fill:.2f}), not a {obj.shape}", blobs
            )
    if spec.relation is not None:
        first, second = (blobs[o.color] for o in spec.objects)
        if not relation_holds(spec.relation, first, second):
            return Verdict(
                False,
                f"the {spec.objects[0]} at {first.centroid[0]:.1f},{first.centroid[1]:.1f} is not {spec.relation} "
                f"the {spec.objects[1]} at {second.centroid[0]:.1f},{second.centroid[1]:.1f}",
                blobs,
            )
    return Verdict(True, "ok", blobs)


def score_images(images: np.ndarray, captions: list[str]) -> tuple[float, list[Verdict]]:
    """(fraction of images that show their caption, one verdict per image); images uint8 [N, H, W, 3]."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images for {len(captions)} captions")
    verdicts = [check_image(image, caption) for image, caption in zip(images, captions)]
    return sum(v.ok for v in verdicts) / max(len(verdicts), 1), verdicts
