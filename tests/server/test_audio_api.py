"""/v1/audio/speech (OpenAI's speech shape, with the official client) and /v1/audio/generations on a
tiny Stable Audio server (1 s of stereo at 60 Hz)."""

import importlib.util
import re

import httpx
import numpy as np
import pytest
from openai import OpenAI

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.audio_io import PCM_SCALE, decode_audio

HAS_SOUNDFILE = importlib.util.find_spec("soundfile") is not None
FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def audio_server(start_server, tiny_checkpoint):
    return start_server(tiny_checkpoint("stable-audio"), "--served-model-name", "tiny-audio")


def post(server, path, body):
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_openai_speech_client_gets_a_wav_of_the_requested_seconds(audio_server, tiny_checkpoint):
    client = OpenAI(base_url=f"{audio_server.url}/v1", api_key="unused")
    # The client requires a voice; a text-to-audio model has none and ignores it.
    response = client.audio.speech.create(model="tiny-audio", voice="alloy", input="a drum loop",
                                          response_format="wav", extra_body={"seconds": 0.5, "seed": 4, **FAST})
    served, rate = decode_audio(response.content)
    assert rate == 60 and served.shape == (2, 30)
    with Omni(tiny_checkpoint("stable-audio"), dtype="float32", device="cpu", disable_progress_bar=True) as omni:
        (offline,) = omni.generate("a drum loop", OmniDiffusionSamplingParams(audio_end_in_s=0.5, seed=4, **FAST))
    assert np.abs(served - np.clip(offline.audio[0], -1, 1)).max() <= 0.5 / PCM_SCALE + 1e-7


def test_generations_endpoint_takes_the_window_and_reports_seed_and_rate(audio_server):
    window = {"audio_start_in_s": 0.25, "audio_end_in_s": 0.75, "seed": 3, **FAST}
    r = post(audio_server, "/v1/audio/generations", {"prompt": "rain", **window})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    assert r.headers["x-seed"] == "3" and r.headers["x-sample-rate"] == "60"
    audio, _ = decode_audio(r.content)
    assert audio.shape == (2, 30)
    # The same clip through the speech endpoint, as start + seconds.
    speech = post(audio_server, "/v1/audio/speech",
                  {"input": "rain", "audio_start_in_s": 0.25, "seconds": 0.5, "seed": 3, **FAST})
    assert speech.status_code == 200 and speech.content == r.content


def test_default_format_is_wav_and_length_is_the_models_clip(audio_server):
    r = post(audio_server, "/v1/audio/speech", {"model": "tiny-audio", "input": "wind", "voice": {"id": "v1"},
                                                 "speed": 1, **FAST})
    assert r.status_code == 200, r.text
    assert r.content[:4] == b"RIFF" and decode_audio(r.content)[0].shape == (2, 60)


def test_flac_when_soundfile_is_installed(audio_server):
    body = {"input": "birdsong", "response_format": "flac", "seed": 1, **FAST}
    r = post(audio_server, "/v1/audio/speech", body)
    if not HAS_SOUNDFILE:
        assert r.status_code == 400 and "supported: wav" in r.json()["error"]["message"]
        return
    assert r.status_code == 200 and r.headers["content-type"] == "audio/flac" and r.content[:4] == b"fLaC"
    wav = post(audio_server, "/v1/audio/speech", {**body, "response_format": "wav"})
    assert np.array_equal(decode_audio(r.content)[0], decode_audio(wav.content)[0])


SUPPORTED = "wav, flac" if HAS_SOUNDFILE else "wav"
REFUSED = [
    ("mp3", {"response_format": "mp3"}, "response_format", f"audio format 'mp3' is not supported; supported: {SUPPORTED}"),
    ("speed", {"speed": 1.5}, "speed", "only speed 1 is supported"),
    ("instructions", {"instructions": "whisper"}, "instructions", "instructions are not supported"),
    ("sse", {"stream_format": "sse"}, "stream_format", "only stream_format 'audio'"),
    ("too_long", {"seconds": 2}, "audio_end_in_s", "audio_end_in_s=2.0 is beyond StableAudioPipeline's longest clip"),
    ("empty_window", {"audio_start_in_s": 0.5, "audio_end_in_s": 0.5}, "audio_start_in_s", "must be less than"),
    ("seconds_and_end", {"seconds": 0.5, "audio_end_in_s": 0.5}, "seconds", "give seconds or audio_end_in_s"),
    ("true_cfg", {"true_cfg_scale": 2}, "true_cfg_scale", "true_cfg_scale=2.0 is not used by StableAudioPipeline"),
    ("negative_without_cfg", {"negative_prompt": "hum", "guidance_scale": 1}, "negative_prompt",
     "negative_prompt is not used when guidance_scale=1.0"),
    ("unknown_field", {"size": "64x64"}, "size", "unknown field 'size'"),
    ("no_input", {"input": ""}, "input", "input"),
]


@pytest.mark.parametrize("body, param, message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_speech_refusals_name_the_field(audio_server, body, param, message):
    r = post(audio_server, "/v1/audio/speech", {"input": "rain", **FAST, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_other_endpoints_and_models_are_refused(audio_server):
    r = post(audio_server, "/v1/images/generations", {"prompt": "rain"})
    assert r.status_code == 400 and "use /v1/audio/generations" in r.json()["error"]["message"]
    r = post(audio_server, "/v1/audio/speech", {"input": "rain", "model": "tts-1"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_metrics_count_audio_outputs(audio_server):
    def audio_outputs() -> float:
        text = httpx.get(f"{audio_server.url}/metrics").text
        match = re.search(r'diffserve_outputs_total\{kind="audio"\} (\S+)', text)
        return float(match.group(1)) if match else 0.0

    before = audio_outputs()
    assert post(audio_server, "/v1/audio/speech", {"input": "rain", **FAST}).status_code == 200
    assert post(audio_server, "/v1/audio/speech", {"input": "rain", "speed": 2}).status_code == 400
    assert audio_outputs() == before + 1
    text = httpx.get(f"{audio_server.url}/metrics").text
    assert 'diffserve_requests_total{endpoint="/v1/audio/speech",status="200"}' in text
    assert 'diffserve_request_seconds_count{endpoint="/v1/audio/speech"}' in text
