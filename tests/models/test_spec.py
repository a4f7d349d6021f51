"""SamplingSpec declarations that contradict themselves are refused when the spec is built."""

import pytest

from diffserve.models.spec import ImageInputSpec, SamplingSpec


def test_image_sizing_rules_must_be_consistent():
    with pytest.raises(ValueError, match="size_from_aspect_ratio needs size_from_image"):
        ImageInputSpec(size_from_aspect_ratio=True)
    with pytest.raises(ValueError, match="either to the output size or to preferred_sizes, not both"):
        ImageInputSpec(resized_to_output=True, preferred_sizes=((1024, 1024),))
    with pytest.raises(ValueError, match=r"preferred_sizes must be \(width, height\) pairs"):
        ImageInputSpec(preferred_sizes=((1024, 0),))
    images = ImageInputSpec(size_from_image=True, size_from_aspect_ratio=True)
    with pytest.raises(ValueError, match="size_from_aspect_ratio needs the parameter max_area with a default"):
        SamplingSpec(modality="image", params=frozenset({"height", "width"}), images=images)
    images = ImageInputSpec(size_from_image=True, size_from_aspect_ratio=True, params=frozenset({"max_area"}))
    SamplingSpec(modality="image", params=frozenset(), defaults={"max_area": 4096}, images=images)
