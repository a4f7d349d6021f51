"""Admission: every model family refuses each sampling parameter it does not use, naming it and the
model; parameters that would be silently ignored in context (a negative prompt without CFG, strength
without an input image, a refining or CFG-only parameter alone) are errors too. One path for Omni, the
CLI and the server."""

import dataclasses

import pytest

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.engine.admission import InvalidRequestError, admit
from diffserve.models.spec import UNIVERSAL_PARAMS, SamplingSpec
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
}
# Every family takes `lora` only when the engine loaded LoRA adapters (tests/lora).
UNUSED = {arch: (model, [*params, "lora"]) for arch, (model, params) in UNUSED.items()}
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
    if with_image or arch == "wan2.1-i2v":  # image-to-video always needs its first frame
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
