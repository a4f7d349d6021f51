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


def test_parameter_rules_name_taken_parameters_and_cfg_only_ones_have_no_default():
    with pytest.raises(ValueError, match=r"rules for parameters it does not take: \['height', 'strength'\]"):
        SamplingSpec(modality="image", params=frozenset({"guidance_scale"}), refines={"strength": "height"})
    layers = frozenset({"skip_guidance_layers"})
    with pytest.raises(ValueError, match=r"cfg_only_params \['skip_guidance_layers'\] without a CFG mode"):
        SamplingSpec(modality="image", params=layers, cfg_only_params=layers)
    with pytest.raises(ValueError, match=r"cfg_only_params \['skip_guidance_layers'\] must not have defaults"):
        SamplingSpec(modality="image", params=layers, defaults={"skip_guidance_layers": (1,)}, cfg="guidance",
                     cfg_only_params=layers)
    SamplingSpec(modality="image", params=layers, cfg="guidance", cfg_only_params=layers,
                 index_limits={"skip_guidance_layers": 4}, unavailable={"skip_guidance_layers": "a reason"})
