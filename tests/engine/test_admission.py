"""Admission: every model family refuses each sampling parameter it does not use, naming it and the
model; parameters that would be silently ignored in context (a negative prompt without CFG, strength
without an input image) are errors too. One path for Omni, the CLI and the server."""

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
    "image": None,  # stands for an input image
}
# Per family: the pipeline class and every parameter it must refuse.
EDIT_SIZING = ["max_area", "auto_resize"]  # FLUX.1 Kontext's input and output sizing
AUDIO_WINDOW = ["audio_start_in_s", "audio_end_in_s"]  # Stable Audio's clip
UNUSED = {
    "demo-dit": ("DiffservePixelDiTPipeline",
                 ["true_cfg_scale", "num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2", "strength", "image", *EDIT_SIZING]),
    "flux": ("FluxPipeline", ["num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2", *EDIT_SIZING]),
    "flux-schnell": ("FluxPipeline", ["guidance_scale", "num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2",
                                      *EDIT_SIZING]),
    "flux-kontext": ("FluxKontextPipeline", ["num_frames", "fps", *AUDIO_WINDOW, "guidance_scale_2", "strength"]),
    "wan2.1-t2v": ("WanPipeline", ["true_cfg_scale", *AUDIO_WINDOW, "guidance_scale_2", "strength", "image", *EDIT_SIZING]),
    "wan2.2-t2v": ("WanPipeline", ["true_cfg_scale", *AUDIO_WINDOW, "strength", "image", *EDIT_SIZING]),
    "wan2.1-i2v": ("WanImageToVideoPipeline", ["true_cfg_scale", *AUDIO_WINDOW, "guidance_scale_2", "strength",
                                               *EDIT_SIZING]),
    "stable-audio": ("StableAudioPipeline", ["height", "width", "true_cfg_scale", "max_sequence_length", "num_frames",
                                             "fps", "guidance_scale_2", "strength", "image", *EDIT_SIZING]),
}
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
