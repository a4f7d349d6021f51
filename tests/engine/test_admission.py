"""Admission: every model family refuses each sampling parameter it does not use, naming it and the
model; parameters that would be silently ignored in context (a negative prompt without CFG, strength
without an input image, a refining or CFG-only parameter alone) are errors too. One path for Omni, the
CLI and the server."""

import dataclasses

import pytest
from PIL import Image

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.engine.admission import InvalidRequestError, admit, batch_key, cfg_enabled
from diffserve.models.spec import UNIVERSAL_PARAMS, ImageInputSpec, SamplingSpec, size_at_area
from diffserve.request import OmniDiffusionRequest, PromptInput
from diffserve.testing.conformance import sample_image

# A value for every optional sampling parameter (and "image": one input image per prompt).
VALUES = {
    "height": 32,
    "width": 32,
    "num_inference_steps": 2,
    "guidance_scale": 2.0,
    "true_cfg_scale": 2.0,
    "negative_prompt": "blurry",
    "max_sequence_length": 8,
    "num_frames": 5,
    "fps": 8,
    "audio_start_in_s": 0.5,
    "audio_end_in_s": 1.0,
    "guidance_scale_2": 2.0,
    "strength": 0.5,
    "max_area": 1024,
    "auto_resize": False,
    "skip_guidance_layers": [1],
    "skip_layer_guidance_scale": 2.0,
    "skip_layer_guidance_start": 0.1,
    "skip_layer_guidance_stop": 0.5,
    "lora": {"style": 1.0},
    "image": None,  # stands for an input image
}
# Skip-layer guidance: only SD3 takes it.
SLG = ["skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop"]
# Per family: the pipeline class and every parameter it must refuse.
EDIT_SIZING = ["max_area", "auto_resize"]  # FLUX.1 Kontext's input and output sizing
AUDIO_WINDOW = ["audio_start_in_s", "audio_end_in_s"]  # Stable Audio's clip
UNUSED = {
    "demo-dit": ("DiffservePixelDiTPipeline",
                 ["true_cfg_scale", "num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2", "strength", "image",
                  *EDIT_SIZING, *SLG]),
    "flux": ("FluxPipeline", ["num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2", *EDIT_SIZING, *SLG]),
    "flux-schnell": ("FluxPipeline", ["guidance_scale", "num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2",
                                      *EDIT_SIZING, *SLG]),
    "flux-kontext": ("FluxKontextPipeline", ["num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2", "strength",
                                             *SLG]),
    "wan2.1-t2v": ("WanPipeline", ["true_cfg_scale", *AUDIO_WINDOW, "guidance_scale_2", "strength", "image",
                                   *EDIT_SIZING, *SLG]),
    "wan2.2-t2v": ("WanPipeline", ["true_cfg_scale", *AUDIO_WINDOW, "strength", "image", *EDIT_SIZING, *SLG]),
    "wan2.1-i2v": ("WanImageToVideoPipeline", ["true_cfg_scale", *AUDIO_WINDOW, "guidance_scale_2", "strength",
                                               *EDIT_SIZING, *SLG]),
    "stable-audio": ("StableAudioPipeline", ["height", "width", "true_cfg_scale", "max_sequence_length", "num_frames",
                                             "fps", "guidance_scale_2", "strength", "image", *EDIT_SIZING, *SLG]),
    "sd3": ("StableDiffusion3Pipeline",
            ["true_cfg_scale", "num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2", "strength", "image",
             *EDIT_SIZING]),
    "qwen-image": ("QwenImagePipeline", ["guidance_scale", "num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2",
                                         "strength", "image", *EDIT_SIZING, *SLG]),
    # The edit models take the whole prompt (no max_sequence_length) and size their output with max_area.
    **{arch: (model, ["guidance_scale", "max_sequence_length", "num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2",
                      "strength", "auto_resize", *SLG])
       for arch, model in (("qwen-image-edit", "QwenImageEditPipeline"),
                           ("qwen-image-edit-plus", "QwenImageEditPlusPipeline"))},
}
# Every family takes `lora` only when the engine loaded LoRA adapters (tests/lora).
UNUSED = {arch: (model, [*params, "lora"]) for arch, (model, params) in UNUSED.items()}
NEEDS_IMAGE = ("wan2.1-i2v", "qwen-image-edit", "qwen-image-edit-plus")
CASES = [(arch, param) for arch, (_, params) in UNUSED.items() for param in params]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    opened = {}

    def get(arch: str) -> Omni:
        if arch not in opened:
            opened[arch] = Omni(tiny_checkpoint(arch), dtype="float32", device="cpu", disable_progress_bar=True)
        return opened[arch]

    yield get
    for omni in opened.values():
        omni.close()


def _prompt(arch: str, with_image: bool) -> dict:
    prompt = {"prompt": "a red circle"}
    if with_image or arch in NEEDS_IMAGE:  # image-to-video needs its first frame, editing its image
        prompt["image"] = sample_image(32, 32, 0)
    return prompt


@pytest.mark.parametrize("arch, param", CASES, ids=[f"{a}-{p}" for a, p in CASES])
def test_every_family_refuses_the_parameters_it_does_not_use(engines, arch, param):
    model = UNUSED[arch][0]
    params = {} if param == "image" else {param: VALUES[param]}
    match = f"{model} takes no input images" if param == "image" else f"{param}=.* is not used by {model}"
    with pytest.raises(ValueError, match=match):
        engines(arch).generate(_prompt(arch, param == "image"), OmniDiffusionSamplingParams(**params))


@pytest.mark.parametrize("arch", list(UNUSED))
def test_the_refusal_table_is_complete(engines, arch):
    """Each family's table lists exactly the parameters its spec does not accept, so a new sampling
    parameter cannot join without every family saying whether it uses it."""
    spec = engines(arch).engine.spec
    optional = {f.name for f in dataclasses.fields(OmniDiffusionSamplingParams)} - UNIVERSAL_PARAMS
    refused = optional - spec.accepted_params | ({"image"} if not spec.takes_images else set())
    assert refused == set(UNUSED[arch][1])
    assert set(VALUES) >= optional  # every parameter has a test value


def test_a_negative_prompt_without_cfg_is_refused(engines):
    with pytest.raises(ValueError, match="negative_prompt is used only with true_cfg_scale > 1"):
        engines("flux").generate({"prompt": "a fox", "negative_prompt": "blurry"}, OmniDiffusionSamplingParams())
    with pytest.raises(ValueError, match="true_cfg_scale=3.0 needs a negative_prompt"):
        engines("flux").generate("a fox", OmniDiffusionSamplingParams(true_cfg_scale=3.0))
    with pytest.raises(ValueError, match=r"negative_prompt is not used when guidance_scale=1.0"):
        engines("demo-dit").generate({"prompt": "a red circle", "negative_prompt": "x"},
                                     OmniDiffusionSamplingParams(guidance_scale=1.0))


def test_strength_needs_an_input_image(engines):
    with pytest.raises(ValueError, match="strength is used only with an input image"):
        engines("flux").generate("a fox", OmniDiffusionSamplingParams(strength=0.5))


def test_defaults_are_filled_before_the_pipeline_runs(engines):
    omni = engines("flux")
    req = OmniDiffusionRequest(prompts=[PromptInput(prompt="a", seed=0)], sampling_params=OmniDiffusionSamplingParams())
    sp = omni.engine.admit(req).sampling_params
    # The tiny checkpoint's own defaults (model_index.json) over FLUX's (guidance 3.5, T5 limit 512).
    assert (sp.height, sp.width, sp.num_inference_steps, sp.guidance_scale, sp.max_sequence_length) == (
        32, 32, 4, 3.5, 512)
    assert sp.strength is None  # an image-to-image default, not used without an image


# -- the audio clip window (SamplingSpec.max_audio_seconds) -------------------------------------------
AUDIO = SamplingSpec(
    modality="audio",
    params=frozenset({"audio_start_in_s", "audio_end_in_s"}),
    defaults={"audio_start_in_s": 0.0, "audio_end_in_s": 10.0},
    max_audio_seconds=10.0,
    model="AudioModel",
)


def _admit_audio(**params):
    sp = OmniDiffusionSamplingParams(**params)
    return admit(AUDIO, OmniDiffusionRequest(prompts=[PromptInput.from_user("rain", sp)], sampling_params=sp))


def test_audio_window_defaults_to_the_whole_clip():
    sp = _admit_audio().sampling_params
    assert (sp.audio_start_in_s, sp.audio_end_in_s) == (0.0, 10.0)
    sp = _admit_audio(audio_start_in_s=2.5, audio_end_in_s=10).sampling_params
    assert (sp.audio_start_in_s, sp.audio_end_in_s) == (2.5, 10)


@pytest.mark.parametrize(
    "params, param, message",
    [
        ({"audio_end_in_s": 10.5}, "audio_end_in_s", "audio_end_in_s=10.5 is beyond AudioModel's longest clip of 10 s"),
        ({"audio_start_in_s": 4, "audio_end_in_s": 4}, "audio_start_in_s", "must be less than audio_end_in_s=4"),
        ({"audio_start_in_s": 11}, "audio_start_in_s", "audio_start_in_s=11 must be less than audio_end_in_s=10.0"),
    ],
    ids=["end_beyond_clip", "empty", "start_after_default_end"],
)
def test_audio_window_outside_the_clip_is_refused(params, param, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        _admit_audio(**params)
    assert info.value.param == param


def test_negative_seconds_are_invalid_sampling_params():
    with pytest.raises(ValueError, match="audio_start_in_s must be >= 0"):
        OmniDiffusionSamplingParams(audio_start_in_s=-1)


# -- the rules that tie parameters together (SD3's skip-layer guidance uses all four), on a stand-in spec --


def guided_spec(**kw) -> SamplingSpec:
    defaults = {"guidance_scale": 7.0, "skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.01,
                "skip_layer_guidance_stop": 0.2}
    rules = dict(
        refines={name: "skip_guidance_layers" for name in SLG[1:]},
        cfg_only_params=frozenset({"skip_guidance_layers"}),
        index_limits={"skip_guidance_layers": 4},
    )
    return SamplingSpec(modality="image", params=frozenset({*defaults, "skip_guidance_layers"}), defaults=defaults,
                        cfg="guidance", model="GuidedPipeline", **{**rules, **kw})


def plain_request(**kw) -> OmniDiffusionRequest:
    return OmniDiffusionRequest(prompts=[PromptInput(prompt="a cat", seed=0)],
                                sampling_params=OmniDiffusionSamplingParams(**kw))


def test_a_refining_parameter_needs_the_one_it_refines():
    with pytest.raises(InvalidRequestError, match="skip_layer_guidance_start is used only together with "
                                                  "skip_guidance_layers, which this request does not set") as err:
        admit(guided_spec(), plain_request(skip_layer_guidance_start=0.1))
    assert err.value.param == "skip_layer_guidance_start"
    admitted = admit(guided_spec(), plain_request(skip_guidance_layers=[1], skip_layer_guidance_start=0.1))
    assert admitted.sampling_params.skip_layer_guidance_start == 0.1
    assert admitted.sampling_params.skip_layer_guidance_stop == 0.2  # its default


def test_defaults_of_refining_parameters_do_not_count_as_set():
    admitted = admit(guided_spec(), plain_request())
    assert admitted.sampling_params.skip_guidance_layers is None
    assert admitted.sampling_params.skip_layer_guidance_scale == 2.8


@pytest.mark.parametrize("guidance_scale, allowed", [(1.0, False), (None, True), (1.5, True)])
def test_cfg_only_parameter_needs_cfg_after_defaults(guidance_scale, allowed):
    req = plain_request(skip_guidance_layers=[0], guidance_scale=guidance_scale)
    if allowed:  # None: the default 7.0 turns CFG on
        assert admit(guided_spec(), req).sampling_params.skip_guidance_layers == (0,)
    else:
        with pytest.raises(InvalidRequestError, match=r"skip_guidance_layers is used only with classifier-free "
                                                      r"guidance \(guidance_scale > 1\)"):
            admit(guided_spec(), req)


@pytest.mark.parametrize("layers", [[4], [0, 7]])
def test_indices_must_be_in_range(layers):
    with pytest.raises(InvalidRequestError, match=rf"skip_guidance_layers={layers} is out of range: GuidedPipeline "
                                                  r"takes indices 0 to 3".replace("[", r"\[").replace("]", r"\]")):
        admit(guided_spec(), plain_request(skip_guidance_layers=layers))


def test_unavailable_parameter_names_the_reason():
    refused = guided_spec(unavailable={"skip_guidance_layers": "the step cache cannot follow it"})
    with pytest.raises(InvalidRequestError, match="skip_guidance_layers cannot be used here: the step cache cannot "
                                                  "follow it"):
        admit(refused, plain_request(skip_guidance_layers=[1]))
    admit(refused, plain_request())  # requests without it run


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"skip_guidance_layers": []}, "skip_guidance_layers must be a non-empty list of block indices >= 0"),
        ({"skip_guidance_layers": [1, -1]}, "skip_guidance_layers must be a non-empty list of block indices >= 0"),
        ({"skip_guidance_layers": 3}, "skip_guidance_layers must be a non-empty list of block indices >= 0"),
        ({"skip_layer_guidance_scale": -1.0}, "skip_layer_guidance_scale must be a number >= 0"),
        ({"skip_layer_guidance_stop": 1.5}, r"skip_layer_guidance_stop is a fraction of the denoise steps in \[0, 1\]"),
        ({"skip_layer_guidance_start": 0.3, "skip_layer_guidance_stop": 0.2},
         r"skip_layer_guidance_start \(0.3\) must be below skip_layer_guidance_stop \(0.2\)"),
    ],
)
def test_skip_layer_guidance_params_are_checked_on_creation(kw, message):
    with pytest.raises(ValueError, match=message):
        OmniDiffusionSamplingParams(**kw)


def test_skip_guidance_layers_become_a_tuple_for_the_batch_key():
    sp = OmniDiffusionSamplingParams(skip_guidance_layers=[7, 8, 9])
    assert sp.skip_guidance_layers == (7, 8, 9)
    hash(sp.batch_key())
# -- input images and the true-CFG default, against a declared spec (no model loaded) ---------------

# An editing model as Qwen-Image-Edit-Plus declares it: output size from the last image's aspect ratio
# at max_area pixels, inputs used at about 1024 x 1024 pixels (sides rounded to 32), multiples of 16;
# with a small input pixel limit to test it.
EDIT_SPEC = SamplingSpec(
    modality="image",
    params=frozenset({"height", "width", "num_inference_steps", "true_cfg_scale"}),
    defaults={"num_inference_steps": 50, "true_cfg_scale": 4.0, "max_area": 1024 * 1024},
    cfg="true_cfg",
    images=ImageInputSpec(max_per_prompt=3, required=True, params=frozenset({"max_area"}), size_from_image=True,
                          size_from_aspect_ratio=True, size_image=-1, area_rounding=32, input_area=1024 * 1024,
                          max_input_pixels=1000 * 1000),
    size_multiple=16,
    model="EditModel",
)


def request(*prompts, **params) -> OmniDiffusionRequest:
    sp = OmniDiffusionSamplingParams(**params)
    return OmniDiffusionRequest(prompts=[PromptInput.from_user(p, sp) for p in prompts], sampling_params=sp)


def rgb(width=64, height=48):
    return Image.new("RGB", (width, height), "red")


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"prompt": "x"}, "EditModel needs an input image with every prompt"),
        ({"prompt": "x", "image": [rgb()] * 4}, "takes at most 3 input image\\(s\\) per prompt, got 4"),
        ({"prompt": "x", "image": "cat.png"}, "input images must be PIL images, got str"),
        ({"prompt": "x", "image": Image.new("I;16", (64, 48))}, "mode 'I;16' \\(more than 8 bits per channel\\)"),
        ({"prompt": "x", "image": Image.new("F", (64, 48))}, "mode 'F'"),
        ({"prompt": "x", "image": rgb(4097, 8)}, "input image is 4097x8; each side must be between 1 and 4096"),
        ({"prompt": "x", "image": rgb(1001, 1000)}, "1001x1000 = 1001000 pixels; at most 1000000 are allowed"),
        # Used at about 1024 x 1024 pixels, a 100:1 image would be 10240 pixels wide.
        ({"prompt": "x", "image": rgb(2000, 20)}, "would be used at 10240x96; its sides must be between 16 and 4096"),
    ],
    ids=["missing", "too_many", "not_pil", "16_bit", "float", "side", "pixels", "used_at_too_wide"],
)
def test_bad_input_images_are_refused_naming_image(prompt, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        admit(EDIT_SPEC, request(prompt))
    assert error.value.param == "image"


def test_prompts_of_one_request_must_use_their_images_at_one_size():
    with pytest.raises(InvalidRequestError, match="uses the input images of this request at different sizes"):
        admit(EDIT_SPEC, request({"prompt": "a", "image": rgb(64, 48)}, {"prompt": "b", "image": rgb(48, 64)}))
    # 64x48 and 640x480: one aspect ratio, both used at 1184x896.
    admitted = admit(EDIT_SPEC, request({"prompt": "a", "image": rgb(64, 48)}, {"prompt": "b", "image": rgb(640, 480)}))
    assert len(admitted.prompts) == 2


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK", "1"])
def test_8_bit_images_are_converted_to_rgb(mode):
    image = Image.new(mode, (64, 48))
    admitted = admit(EDIT_SPEC, request({"prompt": "x", "image": [rgb(), image]}))
    assert [i.mode for i in admitted.prompts[0].images] == ["RGB", "RGB"]
    assert image.mode == mode  # the caller's image is left as it was


def test_output_size_from_the_sizing_image_at_max_area():
    """The last image (48x64, 3:4) at about 1024 x 1024 pixels: 896x1184 (sides rounded to 32, as the
    reference computes them), then down to multiples of 16; max_area or an explicit size win."""
    admitted = admit(EDIT_SPEC, request({"prompt": "x", "image": [rgb(64, 48), rgb(48, 64)]}))
    assert (admitted.sampling_params.width, admitted.sampling_params.height) == (896, 1184)
    admitted = admit(EDIT_SPEC, request({"prompt": "x", "image": rgb(64, 48)}, max_area=256 * 256))
    assert (admitted.sampling_params.width, admitted.sampling_params.height) == (288, 224)
    admitted = admit(EDIT_SPEC, request({"prompt": "x", "image": rgb(64, 48)}, height=512, width=256))
    assert (admitted.sampling_params.width, admitted.sampling_params.height) == (256, 512)


def test_size_at_area_rounds_as_each_reference():
    assert size_at_area(64, 48, 1024 * 1024, 32) == (1184, 896)  # Qwen-Image-Edit: to multiples of 32
    assert size_at_area(300, 100, 1024 * 1024, 32) == (1760, 576)
    assert size_at_area(64, 48, 1024 * 1024) == (1182, 887)  # FLUX.1 Kontext: to whole pixels


def test_true_cfg_default_applies_only_with_a_negative_prompt():
    image = rgb()
    without = admit(EDIT_SPEC, request({"prompt": "x", "image": image}))
    assert without.sampling_params.true_cfg_scale is None and not cfg_enabled(EDIT_SPEC, without.sampling_params)
    with_negative = admit(EDIT_SPEC, request({"prompt": "x", "image": image, "negative_prompt": "blurry"}))
    assert with_negative.sampling_params.true_cfg_scale == 4.0 and cfg_enabled(EDIT_SPEC, with_negative.sampling_params)
    explicit = admit(EDIT_SPEC, request({"prompt": "x", "image": image, "negative_prompt": " "}, true_cfg_scale=2.0))
    assert explicit.sampling_params.true_cfg_scale == 2.0
    with pytest.raises(InvalidRequestError, match="negative_prompt is used only with true_cfg_scale > 1"):
        admit(EDIT_SPEC, request({"prompt": "x", "image": image, "negative_prompt": "a"}, true_cfg_scale=1.0))
    with pytest.raises(InvalidRequestError, match="true_cfg_scale=3.0 needs a negative_prompt"):
        admit(EDIT_SPEC, request({"prompt": "x", "image": image}, true_cfg_scale=3.0))


def test_batch_key_holds_the_sizes_the_images_are_used_at():
    def key(*sizes):
        return batch_key(EDIT_SPEC, admit(EDIT_SPEC, request({"prompt": "x", "image": [rgb(*s) for s in sizes]},
                                                             height=256, width=256)))

    assert key((64, 48)) == key((640, 480))  # both used at 1184x896
    assert key((64, 48)) != key((48, 64))
    assert key((64, 48), (32, 32)) != key((64, 48))
