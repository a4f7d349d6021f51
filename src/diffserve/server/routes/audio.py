"""POST /v1/audio/generations and POST /v1/audio/speech (OpenAI's speech shape): text-to-audio,
answered with the audio file (WAV, or FLAC when soundfile is installed)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from diffserve.audio_io import encode_audio
from diffserve.server.common import build_request, check_model, request_lora, require_modality, run_request
from diffserve.server.errors import APIError
from diffserve.server.protocol import AudioClipFields, AudioGenerationRequest, SpeechRequest
from diffserve.server.state import ServerState

MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    async def generate(request: Request, endpoint: str, prompt: str, body: AudioClipFields) -> Response:
        adapter = check_model(state, body.model)
        require_modality(state, "audio", endpoint)
        try:
            clip = body.clip_params()
        except ValueError as exc:
            raise APIError(400, str(exc), "seconds") from None
        req = build_request(
            prompt, **clip, num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
            true_cfg_scale=body.true_cfg_scale, negative_prompt=body.negative_prompt, seed=body.seed,
            output_type="np", lora=request_lora(adapter, body.lora),
        )
        out = await run_request(state, request, req)
        data = await run_in_threadpool(encode_audio, out.audio[0], out.sample_rate, body.response_format)
        state.metrics.outputs.labels(kind="audio").inc()
        headers = {"X-Seed": str(out.seed), "X-Sample-Rate": str(out.sample_rate)}
        return Response(content=data, media_type=MEDIA_TYPES[body.response_format], headers=headers)

    @api.post("/v1/audio/generations")
    async def audio_generations(body: AudioGenerationRequest, request: Request):
        return await generate(request, "/v1/audio/generations", body.prompt, body)

    @api.post("/v1/audio/speech")
    async def audio_speech(body: SpeechRequest, request: Request):
        return await generate(request, "/v1/audio/speech", body.input, body)

    return api
