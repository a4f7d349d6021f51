"""POST /v1/audio/generations: text-to-audio, answered with a WAV file."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from diffserve.server.common import build_request, check_model, require_modality, run_request
from diffserve.server.encoding import encode_wav
from diffserve.server.protocol import AudioGenerationRequest
from diffserve.server.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/audio/generations")
    async def audio_generations(body: AudioGenerationRequest, request: Request):
        check_model(state, body.model)
        require_modality(state, "audio", "/v1/audio/generations")
        req = build_request(
            body.prompt, audio_end_in_s=body.seconds, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, negative_prompt=body.negative_prompt, seed=body.seed,
            output_type="np",
        )
        out = await run_request(state, request, req)
        wav = await run_in_threadpool(encode_wav, out.audio[0], out.sample_rate)
        state.metrics.outputs.labels(kind="audio").inc()
        return Response(content=wav, media_type="audio/wav", headers={"X-Seed": str(out.seed)})

    return api
