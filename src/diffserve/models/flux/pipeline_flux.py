"""FLUX.1 text-to-image (dev with distilled guidance, schnell without), with optional true CFG, and
image-to-image when a prompt brings an image (the input is re-noised to `strength` and denoised, as
diffusers' FluxImg2ImgPipeline does)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import DiffusionPipelineBase, PipelineRun, repeat_per_output
from diffserve.models.denoise import DenoiseState
from diffserve.models.flow_match import default_sigmas, set_timesteps, shift_from_scheduler_config
from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig
from diffserve.models.outputs import denormalize_images, seeded_noise
from diffserve.models.spec import ImageInputSpec, SamplingSpec
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

T5_MAX_LENGTH = 512


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 latent patch becomes one token."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents; height/width are the latent sizes."""
    b, _, channels = latents.shape
    latents = latents.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Position ids [(H/2)(W/2), 3] = (0, row, col) of each packed token."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxPipeline(DiffusionPipelineBase):
    _encoder_modules: ClassVar[list[str]] = ["text_encoder", "text_encoder_2"]
    _vae_modules: ClassVar[list[str]] = ["vae"]
    cfg_batched_inputs = ("hidden_states", "timestep", "guidance", "encoder_hidden_states", "pooled_projections")
    supports_step_batching: ClassVar[bool] = True

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path, dtype = od_config.model, od_config.torch_dtype
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder_2 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2")

        self.add_checkpoint_module(
            "transformer", FluxTransformer2DModel, FluxTransformerConfig.from_pretrained(f"{path}/transformer")
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor * 2, vae_latent_channels=self.vae.config.latent_channels
        )

    def sampling_spec(self) -> SamplingSpec:
        distilled = self.transformer.config.guidance_embeds  # dev: distilled guidance; schnell: none
        size = 128 * self.vae_scale_factor
        params = {"height", "width", "num_inference_steps", "true_cfg_scale", "max_sequence_length"}
        defaults = {"height": size, "width": size, "num_inference_steps": 28 if distilled else 4,
                    "max_sequence_length": T5_MAX_LENGTH, "strength": 0.6}
        if distilled:
            params.add("guidance_scale")
            defaults["guidance_scale"] = 3.5
        return SamplingSpec(
            modality="image",
            params=frozenset(params),
            defaults=defaults,
            cfg="true_cfg",
            images=ImageInputSpec(max_per_prompt=1, params=frozenset({"strength"}), size_from_image=True,
                                  resized_to_output=True),
            # The VAE downsamples by vae_scale_factor and latents are packed in 2x2 patches.
            size_multiple=self.vae_scale_factor * 2,
            max_sequence_length=T5_MAX_LENGTH,
        )

    # -- stages -------------------------------------------------------------------------------------

    def encode_prompt(
        self, prompts: list[str], outputs_per_prompt: int, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 sequence embeddings [B*k, L, D], pooled CLIP embeddings [B*k, D_pool])."""
        clip_ids = self.tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length).input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenize(self.tokenizer_2, prompts, max_sequence_length).input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        k = outputs_per_prompt
        return repeat_per_output(embeds.to(self.dtype), k), repeat_per_output(pooled.to(self.dtype), k)

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.spec.size_multiple
        return 2 * (height // m), 2 * (width // m)

    def prepare_latents(
        self, seeds: list[int], outputs_per_prompt: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        latent_h, latent_w = self._latent_size(height, width)
        channels = self.transformer.config.in_channels // 4
        noise = seeded_noise(seeds, outputs_per_prompt, (channels, latent_h, latent_w), self.device, self.dtype)
        return pack_latents(noise), latent_image_ids(latent_h, latent_w, self.device)

    def prepare_timesteps(self, num_inference_steps: int, image_seq_len: int) -> torch.Tensor:
        sigmas = None if self.scheduler.config.get("use_flow_sigmas") else default_sigmas(num_inference_steps)
        mu = shift_from_scheduler_config(self.scheduler, image_seq_len)
        return set_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)

    def strength_timesteps(self, timesteps: torch.Tensor, num_inference_steps: int, strength: float) -> torch.Tensor:
        """Image-to-image starts part-way: keep the last `strength` of the schedule (admission made
        sure at least one step is left)."""
        start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        self.scheduler.set_begin_index(start)
        return timesteps[start:]

    def prepare_image_latents(
        self, images: list, seeds: list[int], outputs_per_prompt: int, height: int, width: int, t0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each prompt's image, then noise it to the first kept timestep.

        One CPU generator per seed is used first for the VAE posterior sample, then for the noise, as
        diffusers' FluxImg2ImgPipeline uses the generator of each prompt.
        """
        pixels = self.image_processor.preprocess(images, height=height, width=width)
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latent_h, latent_w = self._latent_size(height, width)
        config = self.vae.config
        k = outputs_per_prompt
        blocks = []
        for i, seed in enumerate(seeds):
            generator = torch.Generator("cpu").manual_seed(seed)
            encoded = self.vae.encode(pixels[i : i + 1]).latent_dist.sample(generator=generator)
            encoded = ((encoded - config.shift_factor) * config.scaling_factor).to(self.dtype)
            noise = torch.randn((k, encoded.shape[1], latent_h, latent_w), generator=generator, dtype=self.dtype)
            blocks.append(self.scheduler.scale_noise(encoded.expand(k, -1, -1, -1), t0.repeat(k), noise.to(self.device)))
        return pack_latents(torch.cat(blocks)), latent_image_ids(latent_h, latent_w, self.device)

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        latents = unpack_latents(latents, *self._latent_size(height, width))
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return denormalize_images(self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0])

    # -- the whole call -----------------------------------------------------------------------------

    def prepare_denoise(self, req: OmniDiffusionRequest) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The initial packed latents, the timesteps to run, and the image-side transformer inputs fixed
        for the whole request (position ids)."""
        sp = req.sampling_params
        height, width, steps, k = sp.height, sp.width, sp.num_inference_steps, sp.num_outputs_per_prompt
        if not req.prompts[0].images:
            latents, img_ids = self.prepare_latents(req.seeds, k, height, width)
            timesteps = self.prepare_timesteps(steps, latents.shape[1])
            return latents, timesteps, {"img_ids": img_ids}
        latent_h, latent_w = self._latent_size(height, width)
        timesteps = self.prepare_timesteps(steps, (latent_h // 2) * (latent_w // 2))
        timesteps = self.strength_timesteps(timesteps, steps, sp.strength)
        images = [p.images[0] for p in req.prompts]
        latents, img_ids = self.prepare_image_latents(images, req.seeds, k, height, width, timesteps[:1])
        return latents, timesteps, {"img_ids": img_ids}

    def begin(self, req: OmniDiffusionRequest) -> PipelineRun:
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        timer = self.stage_timer()
        do_true_cfg = self.cfg_enabled(req)
        with timer.stage("encode"):
            embeds, pooled = self.encode_prompt(req.prompt_texts, k, sp.max_sequence_length)
            text_ids = torch.zeros(embeds.shape[1], 3, device=self.device)
            if do_true_cfg:
                neg_embeds, neg_pooled = self.encode_prompt(self.negative_prompts(req), k, sp.max_sequence_length)

        with timer.stage("prepare"):
            latents, timesteps, image_inputs = self.prepare_denoise(req)
            guidance = None
            if sp.guidance_scale is not None:
                guidance = torch.full([latents.shape[0]], sp.guidance_scale, device=self.device, dtype=torch.float32)
            common = {"guidance": guidance, "txt_ids": text_ids, **image_inputs}
            positive = {**common, "encoder_hidden_states": embeds, "pooled_projections": pooled}
            negative = (
                {**common, "encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled}
                if do_true_cfg
                else None
            )
        state = DenoiseState.build(self, latents, timesteps, positive, negative, sp.true_cfg_scale)
        return PipelineRun(req, state, timer)

    def finish(self, run: PipelineRun) -> DiffusionOutput:
        sp, timer, latents = run.req.sampling_params, run.timer, run.state.latents
        if sp.output_type == "latent":
            return DiffusionOutput(output=latents, metrics=timer.timings)
        with timer.stage("decode"):
            images = self.decode_latents(latents, sp.height, sp.width)
        return DiffusionOutput(
            output=images, metrics={**timer.timings, "num_inference_steps": len(run.state.timesteps)}
        )
