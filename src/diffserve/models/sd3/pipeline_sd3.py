"""Stable Diffusion 3 / 3.5 text-to-image (SD3-medium, SD3.5-medium, SD3.5-large, SD3.5-large-turbo),
with classifier-free guidance and, as diffusers has it, skip-layer guidance.

Three text encoders condition the MMDiT: two CLIP models give the pooled vector (their pooled
projections side by side) and, from their penultimate layers, 77 tokens that are zero-padded to the
T5 width and put in front of the T5 tokens.

Skip-layer guidance (SLG, recommended for SD3.5-medium with blocks 7, 8, 9): on the steps inside its
window a third prediction is made from the positive branch with some transformer blocks skipped, and
the guided prediction is pushed away from it. It refines CFG, so it runs only with CFG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import DiffusionPipelineBase, PipelineRun, repeat_per_output
from diffserve.models.denoise import DenoiseState
from diffserve.models.flow_match import set_timesteps, shift_from_scheduler_config
from diffserve.models.outputs import denormalize_images, seeded_noise
from diffserve.models.sd3.sd3_transformer import SD3Transformer2DModel, SD3TransformerConfig
from diffserve.models.spec import SamplingSpec
from diffserve.request import DiffusionOutput, OmniDiffusionRequest, OmniDiffusionSamplingParams

T5_MAX_LENGTH = 512  # diffusers' limit for SD3's max_sequence_length
SLG_TUNING = ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")
# The per-step input that carries skip-layer guidance from the denoise step to predict_guided_noise;
# it never reaches the transformer. Requests stepped together run one call per value of it.
SLG_STEP_INPUT = "skip_layer_guidance"


@dataclass(frozen=True)
class SkipLayerGuidance:
    layers: tuple[int, ...]
    scale: float
    start: float
    stop: float

    def active_steps(self, num_steps: int) -> list[bool]:
        """Whether step i runs it: strictly inside (start, stop) as a fraction of the steps, the
        window diffusers uses (its default 0.01-0.2 of 28 steps is steps 1 to 5)."""
        return [num_steps * self.start < i < num_steps * self.stop for i in range(num_steps)]

    @classmethod
    def from_params(cls, sp: OmniDiffusionSamplingParams) -> "SkipLayerGuidance | None":
        if sp.skip_guidance_layers is None:
            return None
        return cls(
            sp.skip_guidance_layers, sp.skip_layer_guidance_scale, sp.skip_layer_guidance_start,
            sp.skip_layer_guidance_stop,
        )


class StableDiffusion3Pipeline(DiffusionPipelineBase):
    _encoder_modules: ClassVar[list[str]] = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    _vae_modules: ClassVar[list[str]] = ["vae"]
    cfg_batched_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
    supports_step_batching: ClassVar[bool] = True

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path, dtype = od_config.model, od_config.torch_dtype
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        self.text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        self.text_encoder_3 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype)
        self.tokenizer_3 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3")

        self.add_checkpoint_module(
            "transformer", SD3Transformer2DModel, SD3TransformerConfig.from_pretrained(f"{path}/transformer")
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def sampling_spec(self) -> SamplingSpec:
        config = self.transformer.config
        pixels_per_patch = self.vae_scale_factor * config.patch_size
        size = config.sample_size * self.vae_scale_factor
        defaults = {
            # diffusers' StableDiffusion3Pipeline defaults (1024x1024 for the released models).
            "height": size, "width": size, "num_inference_steps": 28, "guidance_scale": 7.0,
            "max_sequence_length": 256,
            "skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.01, "skip_layer_guidance_stop": 0.2,
        }
        unavailable = {}
        if self.od_config.cache_backend is not None:
            unavailable["skip_guidance_layers"] = (
                "skip-layer guidance makes an extra transformer call on some steps, which the step cache "
                f"(cache_backend={self.od_config.cache_backend!r}) cannot follow; run without a cache to use it"
            )
        return SamplingSpec(
            modality="image",
            params=frozenset({*defaults, "skip_guidance_layers"}),
            defaults=defaults,
            cfg="guidance",
            # The VAE downsamples by vae_scale_factor, the transformer patchifies the rest; the largest
            # side is what the transformer's position table covers.
            size_multiple=pixels_per_patch,
            max_side=min(4096, config.pos_embed_max_size * pixels_per_patch),
            max_sequence_length=T5_MAX_LENGTH,
            refines={name: "skip_guidance_layers" for name in SLG_TUNING},
            cfg_only_params=frozenset({"skip_guidance_layers"}),
            index_limits={"skip_guidance_layers": config.num_layers},
            unavailable=unavailable,
        )

    # -- stages -------------------------------------------------------------------------------------

    def encode_clip(self, text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate-layer hidden states [B, 77, D], pooled projection [B, D_proj]) of one CLIP."""
        # Both CLIPs get the first tokenizer's length (77), as in diffusers.
        ids = self.tokenize(tokenizer, prompts, self.tokenizer.model_max_length).input_ids
        out = text_encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def encode_t5(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        ids = self.tokenize(self.tokenizer_3, prompts, max_sequence_length).input_ids
        return self.text_encoder_3(ids.to(self.device))[0]

    def encode_prompt(
        self, prompts: list[str], outputs_per_prompt: int, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence [B*k, 77 + L, D_t5], pooled [B*k, D_pool]). The CLIP tokens, both encoders' features
        side by side and zero-padded to the T5 width, come before the T5 tokens."""
        states_1, pooled_1 = self.encode_clip(self.text_encoder, self.tokenizer, prompts)
        states_2, pooled_2 = self.encode_clip(self.text_encoder_2, self.tokenizer_2, prompts)
        t5 = self.encode_t5(prompts, max_sequence_length)
        clip = torch.cat([states_1, states_2], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip.to(self.dtype), t5.to(self.dtype)], dim=1)
        pooled = torch.cat([pooled_1, pooled_2], dim=-1).to(self.dtype)
        k = outputs_per_prompt
        return repeat_per_output(embeds, k), repeat_per_output(pooled, k)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def prepare_latents(self, seeds: list[int], outputs_per_prompt: int, height: int, width: int) -> torch.Tensor:
        shape = (self.transformer.config.in_channels, *self.latent_size(height, width))
        return seeded_noise(seeds, outputs_per_prompt, shape, self.device, self.dtype)

    def prepare_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The scheduler's own spacing with its shift; with dynamic shifting (a scheduler config
        setting) the shift `mu` follows the number of image tokens, as in diffusers."""
        kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting"):
            latent_h, latent_w = self.latent_size(height, width)
            p = self.transformer.config.patch_size
            kwargs["mu"] = shift_from_scheduler_config(self.scheduler, (latent_h // p) * (latent_w // p))
        return set_timesteps(self.scheduler, num_inference_steps, self.device, **kwargs)

    def predict_guided_noise(
        self,
        do_cfg: bool,
        scales: list[float],
        sizes: list[int],
        positive_kwargs: dict[str, Any],
        negative_kwargs: dict[str, Any] | None,
    ) -> list[torch.Tensor]:
        """CFG, plus on the steps in its window skip-layer guidance: guided + scale * (positive -
        positive with the SLG blocks skipped). Under CFG parallel every rank holds both branches after
        the exchange, so each makes the skip-layer prediction itself (a step then costs two forwards
        per rank, against three in one process)."""
        slg: SkipLayerGuidance | None = positive_kwargs[SLG_STEP_INPUT]
        positive_kwargs = _without(positive_kwargs, SLG_STEP_INPUT)
        negative_kwargs = _without(negative_kwargs, SLG_STEP_INPUT) if negative_kwargs is not None else None
        if slg is None:
            return super().predict_guided_noise(do_cfg, scales, sizes, positive_kwargs, negative_kwargs)
        # Admission lets skip_guidance_layers through only with CFG on.
        positive, negative = self.predict_cfg_branches(positive_kwargs, negative_kwargs)
        skipped = self.predict_noise(**positive_kwargs, skip_layers=slg.layers)
        per_request = zip(positive.split(sizes), negative.split(sizes), skipped.split(sizes), scales)
        return [
            self.combine_cfg_noise(pos, neg, scale) + (pos - skip) * slg.scale for pos, neg, skip, scale in per_request
        ]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return denormalize_images(self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0])

    # -- the whole call: begin + denoise (DiffusionPipelineBase.forward) + finish ------------------

    def begin(self, req: OmniDiffusionRequest) -> PipelineRun:
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        timer = self.stage_timer()
        do_cfg = self.cfg_enabled(req)
        with timer.stage("encode"):
            embeds, pooled = self.encode_prompt(req.prompt_texts, k, sp.max_sequence_length)
            if do_cfg:
                neg_embeds, neg_pooled = self.encode_prompt(self.negative_prompts(req), k, sp.max_sequence_length)

        with timer.stage("prepare"):
            latents = self.prepare_latents(req.seeds, k, sp.height, sp.width)
            timesteps = self.prepare_timesteps(sp.num_inference_steps, sp.height, sp.width)
            slg = SkipLayerGuidance.from_params(sp)
            # Decided on the host before the loop: no step syncs to know whether it runs SLG.
            slg_steps = slg.active_steps(len(timesteps)) if slg is not None else [False] * len(timesteps)
            positive = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
            negative = {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled} if do_cfg else None

        def step_inputs(state: DenoiseState) -> dict[str, Any]:
            # SD3's transformer takes the scheduler's timestep as it is, in [0, 1000].
            latents = state.latents
            return {"hidden_states": latents, "timestep": state.timestep.expand(latents.shape[0]),
                    SLG_STEP_INPUT: slg if slg_steps[state.index] else None}

        state = DenoiseState.build(self, latents, timesteps, positive, negative, sp.guidance_scale, step_inputs)
        metrics = {"num_inference_steps": len(timesteps), "skip_layer_guidance_steps": sum(slg_steps)}
        return PipelineRun(req, state, timer, metrics)

    def finish(self, run: PipelineRun) -> DiffusionOutput:
        sp, timer, latents = run.req.sampling_params, run.timer, run.state.latents
        if sp.output_type == "latent":
            return DiffusionOutput(output=latents, metrics={**timer.timings, **run.metrics})
        with timer.stage("decode"):
            images = self.decode_latents(latents)
        return DiffusionOutput(output=images, metrics={**timer.timings, **run.metrics})


def _without(kwargs: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in kwargs.items() if name != key}
