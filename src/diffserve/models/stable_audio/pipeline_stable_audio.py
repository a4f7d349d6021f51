"""Stable Audio Open text-to-audio: T5 text and seconds conditioning, a latent DiT denoised with
CosineDPMSolverMultistepScheduler (an SDE solver), decoded by the Oobleck VAE.

The model always denoises its whole window (transformer.config.sample_size latent frames, 47.55 s
for stable-audio-open-1.0) and the waveform is cropped to [audio_start_in_s, audio_end_in_s]; the two
seconds also condition the model, as tokens for cross-attention and as its global token.

The scheduler's noise comes from a Brownian tree (torchsde) per prompt seed. It is computed on the
CPU for all steps before the loop, in the order the scheduler would ask for it, so the loop has no
host work and the result does not depend on the device.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import DiffusionPipelineBase, PipelineRun, repeat_per_output
from diffserve.models.denoise import DenoiseState
from diffserve.models.outputs import seeded_noise
from diffserve.models.spec import SamplingSpec
from diffserve.models.stable_audio.stable_audio_transformer import StableAudioDiTConfig, StableAudioDiTModel
from diffserve.request import DiffusionOutput, OmniDiffusionRequest


def brownian_noise(
    seeds: list[int],
    outputs_per_seed: int,
    shape: tuple[int, ...],
    sigmas: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
) -> torch.Tensor:
    """The SDE noise of every step, [steps, len(seeds) * outputs_per_seed, *shape], float32 on the CPU.

    One Brownian tree per seed over its prompt's outputs, queried at (sigmas[i], sigmas[i + 1]) for
    step i in step order: what diffusers' scheduler draws for a prompt run alone with
    `torch.Generator().manual_seed(seed)`, and, for one output per prompt, for a batch run with one
    generator per prompt.
    """
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    template = torch.zeros(outputs_per_seed, *shape)
    samplers = [BrownianTreeNoiseSampler(template, sigma_min, sigma_max, seed=seed) for seed in seeds]
    with warnings.catch_warnings():
        # torchsde warns when asked for increments at its interval ends (sigma_min rounded to float32
        # and the final sigma 0), which the reference schedule always does.
        warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
        steps = [
            torch.cat([sampler(sigma, sigma_next) for sampler in samplers])
            for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:])
        ]
    return torch.stack(steps)


class PrecomputedNoise:
    """Stands in for the scheduler's noise sampler (called as sampler(sigma, sigma_next) in each step):
    hands out the step's precomputed noise, already on the device."""

    def __init__(self, scheduler, noise: torch.Tensor):
        self.scheduler = scheduler
        self.noise = noise

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return self.noise[self.scheduler.step_index]


class StableAudioPipeline(DiffusionPipelineBase):
    _encoder_modules: ClassVar[list[str]] = ["text_encoder", "projection_model"]
    _vae_modules: ClassVar[list[str]] = ["vae"]
    # The timestep ([1], shared by a request's samples) is the same object in both branches.
    cfg_batched_inputs = ("hidden_states", "encoder_hidden_states", "global_hidden_states")
    supports_step_batching: ClassVar[bool] = True

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        from diffusers import AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioProjectionModel
        from transformers import AutoTokenizer, T5EncoderModel

        path, dtype = od_config.model, od_config.torch_dtype
        self.scheduler = CosineDPMSolverMultistepScheduler.from_pretrained(path, subfolder="scheduler")
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        self.projection_model = StableAudioProjectionModel.from_pretrained(
            path, subfolder="projection_model", torch_dtype=dtype
        )
        self.vae = AutoencoderOobleck.from_pretrained(path, subfolder="vae", torch_dtype=dtype)

        self.add_checkpoint_module(
            "transformer", StableAudioDiTModel, StableAudioDiTConfig.from_pretrained(f"{path}/transformer")
        )

    @property
    def sample_rate(self) -> int:
        return self.vae.config.sampling_rate

    @property
    def max_audio_seconds(self) -> float:
        """The model's window (every generation denoises all of it), within the range the seconds
        conditioning was trained on."""
        window = self.transformer.config.sample_size * self.vae.hop_length / self.sample_rate
        return min(window, self.projection_model.config.max_value)

    def sampling_spec(self) -> SamplingSpec:
        return SamplingSpec(
            modality="audio",
            params=frozenset({"audio_start_in_s", "audio_end_in_s", "num_inference_steps", "guidance_scale"}),
            # diffusers' defaults: the whole window, 100 steps, guidance 7.
            defaults={"audio_start_in_s": 0.0, "audio_end_in_s": self.max_audio_seconds,
                      "num_inference_steps": 100, "guidance_scale": 7.0},
            cfg="guidance",
            max_audio_seconds=self.max_audio_seconds,
            # Every request denoises the whole window: its frames and the global token.
            fixed_tokens=self.transformer.config.sample_size + 1,
        )

    # -- stages -------------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected T5 embeddings [B, L, D] at the tokenizer's full length, zero after each text."""
        tokens = self.tokenize(self.tokenizer, texts, self.tokenizer.model_max_length)
        # The execution device: under CPU offload the encoder's weights may still be on the host.
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        projected = self.projection_model(text_hidden_states=hidden).text_hidden_states
        # The transformer gets no text mask: padding is zeros, which it was trained to attend to.
        return (projected * mask[..., None].to(projected.dtype)).to(self.device, self.dtype)

    def encode_seconds(self, start: float, end: float, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(seconds tokens [B, 2, D] for cross-attention, the global conditioning [B, 1, 2D])."""
        out = self.projection_model(
            start_seconds=torch.full((batch,), float(start), device=self.device),
            end_seconds=torch.full((batch,), float(end), device=self.device),
        )
        start_token, end_token = out.seconds_start_hidden_states, out.seconds_end_hidden_states
        tokens = torch.cat([start_token, end_token], dim=1).to(self.device, self.dtype)
        return tokens, torch.cat([start_token, end_token], dim=2).to(self.device, self.dtype)

    def encode_conditioning(
        self, req: OmniDiffusionRequest, do_cfg: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The transformer inputs of the positive and (with CFG) negative branch, one row per output.

        A prompt's unconditional cross-attention input is its negative prompt with the seconds tokens,
        or, without a negative prompt, all zeros (seconds tokens included); both branches share the
        global conditioning.
        """
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        seconds_tokens, global_states = self.encode_seconds(sp.audio_start_in_s, sp.audio_end_in_s, len(req.prompts))
        context = torch.cat([self.encode_text(req.prompt_texts), seconds_tokens], dim=1)
        positive = {"encoder_hidden_states": repeat_per_output(context, k),
                    "global_hidden_states": repeat_per_output(global_states, k)}
        if not do_cfg:
            return positive, None
        negatives = req.negative_prompt_texts
        negative_context = torch.zeros_like(context)
        if any(n is not None for n in negatives):
            encoded = torch.cat([self.encode_text([n or "" for n in negatives]), seconds_tokens], dim=1)
            has_negative = torch.tensor([n is not None for n in negatives], device=self.device)
            negative_context = torch.where(has_negative[:, None, None], encoded, negative_context)
        return positive, {**positive, "encoder_hidden_states": repeat_per_output(negative_context, k)}

    def prepare_latents(self, seeds: list[int], outputs_per_prompt: int) -> torch.Tensor:
        # Latents stay float32 through the SDE steps; the transformer gets a cast copy.
        shape = (self.transformer.config.in_channels, self.transformer.config.sample_size)
        noise = seeded_noise(seeds, outputs_per_prompt, shape, self.device, torch.float32)
        return noise * self.scheduler.init_noise_sigma

    def prepare_timesteps(self, num_inference_steps: int, seeds: list[int], outputs_per_prompt: int) -> torch.Tensor:
        """Set the schedule and the SDE noise of every step; returns the timesteps."""
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)  # so the first step does not look its index up (a host sync)
        config = self.transformer.config
        noise = brownian_noise(
            seeds, outputs_per_prompt, (config.in_channels, config.sample_size), scheduler.sigmas,
            scheduler.config.sigma_min, scheduler.config.sigma_max,
        )
        scheduler.noise_sampler = PrecomputedNoise(scheduler, noise.to(self.device))
        return scheduler.timesteps

    def step_inputs(self, state: DenoiseState) -> dict[str, Any]:
        # The state's own scheduler: it preconditions the latents by its current sigma.
        latents, t = state.latents, state.timestep
        return {"hidden_states": state.scheduler.scale_model_input(latents, t).to(self.dtype), "timestep": t[None]}

    def predict_noise(self, **kwargs: Any) -> torch.Tensor:
        # Requests stepped together bring one timestep per sample, which both CFG branches share: when
        # the branches run as one batch, it repeats for the second.
        timestep, batch = kwargs["timestep"], kwargs["hidden_states"].shape[0]
        if len(timestep) not in (1, batch):
            kwargs["timestep"] = timestep.repeat(batch // len(timestep))
        return self.transformer(**kwargs)

    def decode_latents(self, latents: torch.Tensor, start: float, end: float) -> torch.Tensor:
        """Latents -> float32 waveforms [N, channels, samples] of [start, end) seconds."""
        audio = self.vae.decode(latents.to(self.vae.dtype)).sample
        return audio[:, :, int(start * self.sample_rate) : int(end * self.sample_rate)].float()

    # -- the whole call: begin + denoise (DiffusionPipelineBase.forward) + finish ------------------

    def begin(self, req: OmniDiffusionRequest) -> PipelineRun:
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        timer = self.stage_timer()
        do_cfg = self.cfg_enabled(req)
        with timer.stage("encode"):
            positive, negative = self.encode_conditioning(req, do_cfg)

        with timer.stage("prepare"):
            latents = self.prepare_latents(req.seeds, k)
            timesteps = self.prepare_timesteps(sp.num_inference_steps, req.seeds, k)
        state = DenoiseState.build(self, latents, timesteps, positive, negative, sp.guidance_scale, self.step_inputs)
        metrics = {"num_inference_steps": sp.num_inference_steps, "sample_rate": self.sample_rate}
        return PipelineRun(req, state, timer, metrics)

    def finish(self, run: PipelineRun) -> DiffusionOutput:
        sp, timer, latents = run.req.sampling_params, run.timer, run.state.latents
        if sp.output_type == "latent":
            return DiffusionOutput(output=latents, metrics={**timer.timings, **run.metrics})
        with timer.stage("decode"):
            audio = self.decode_latents(latents, sp.audio_start_in_s, sp.audio_end_in_s)
        return DiffusionOutput(output=audio, metrics={**timer.timings, **run.metrics})
