"""FLUX.1 text-to-image (dev with distilled guidance, schnell without), with optional true CFG, and
image-to-image when a prompt brings an image (the input is re-noised to `strength` and denoised, as
diffusers' FluxImg2ImgPipeline does)."""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
import torch.nn as nn

from diffserve.config import OmniDiffusionConfig
from diffserve.distributed.cfg_parallel import CFGParallelMixin
from diffserve.loader import AutoWeightsLoader, DiffusersPipelineLoader
from diffserve.models.flow_match import default_sigmas, set_timesteps, shift_from_scheduler_config
from diffserve.models.flux.flux_transformer import FluxTransformer2DModel, FluxTransformerConfig
from diffserve.models.denoise import denoise
from diffserve.models.interface import SupportImageInput, SupportsComponentDiscovery
from diffserve.models.outputs import denormalize_images, image_post_process, seeded_noise
from diffserve.models.progress_bar import ProgressBarMixin
from diffserve.models.stage_timer import StageTimer
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)


def get_flux_post_process_func(od_config: OmniDiffusionConfig):
    return image_post_process


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


class FluxPipeline(nn.Module, CFGParallelMixin, ProgressBarMixin, SupportsComponentDiscovery, SupportImageInput):
    _dit_modules: ClassVar[list[str]] = ["transformer"]
    _encoder_modules: ClassVar[list[str]] = ["text_encoder", "text_encoder_2"]
    _vae_modules: ClassVar[list[str]] = ["vae"]

    output_modality: ClassVar[str] = "image"
    cfg_batched_inputs = ("hidden_states", "timestep", "guidance", "encoder_hidden_states", "pooled_projections")
    max_image_side = 4096
    max_sequence_length = 512
    default_strength = 0.6

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__()
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.od_config = od_config
        path, dtype = od_config.model, od_config.torch_dtype
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder_2 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2")

        config = FluxTransformerConfig.from_pretrained(f"{path}/transformer")
        with torch.device("meta"):  # weights come from weights_sources
            self.transformer = FluxTransformer2DModel(config, od_config=od_config).to(dtype)
        self.weights_sources = [
            DiffusersPipelineLoader.ComponentSource(
                model_or_path=path, subfolder="transformer", prefix="transformer.", fall_back_to_pt=True
            )
        ]
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        from diffusers.image_processor import VaeImageProcessor

        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor * 2, vae_latent_channels=self.vae.config.latent_channels
        )
        self.clip_max_length = self.tokenizer.model_max_length
        self.set_progress_bar_config(disable=od_config.disable_progress_bar)

    # -- defaults and checks ------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        # The VAE downsamples by vae_scale_factor and latents are packed in 2x2 patches.
        return self.vae_scale_factor * 2

    def default_size(self) -> int:
        return 128 * self.vae_scale_factor

    def input_images(self, req: OmniDiffusionRequest) -> list | None:
        """One input image per prompt (image-to-image), or None (text-to-image)."""
        counts = {len(p.images or ()) for p in req.prompts}
        if counts == {0}:
            return None
        if counts != {1}:
            raise ValueError(
                f"FLUX image-to-image takes exactly one input image per prompt (got {sorted(counts)} images); "
                f"the prompts of one request must all have one or all have none"
            )
        return [p.images[0] for p in req.prompts]

    def default_size_for(self, images: list | None) -> tuple[int, int]:
        """Text-to-image: the model's default. Image-to-image: the first input image's size, rounded down."""
        if images is None:
            return self.default_size(), self.default_size()
        m = self.size_multiple
        width, height = images[0].size
        clamp = lambda v: max(m, min(self.max_image_side, v // m * m))  # noqa: E731
        return clamp(height), clamp(width)

    def check_inputs(self, req: OmniDiffusionRequest, height: int, width: int, max_sequence_length: int) -> None:
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value % m or not m <= value <= self.max_image_side:
                raise ValueError(
                    f"{name}={value} is not supported: it must be a multiple of {m} between {m} and "
                    f"{self.max_image_side}"
                )
        if max_sequence_length > self.max_sequence_length:
            raise ValueError(
                f"max_sequence_length={max_sequence_length} exceeds the T5 limit {self.max_sequence_length}"
            )
        if not req.prompts:
            raise ValueError("a request needs at least one prompt")

    # -- stages -------------------------------------------------------------------------------------

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        lengths = [len(x) for x in tokenizer(prompts, truncation=False).input_ids]
        if max(lengths) > max_length:
            logger.warning(
                "prompt truncated to %d tokens for %s (it had %d)", max_length, type(tokenizer).__name__, max(lengths)
            )
        return ids.input_ids.to(self.device)

    def encode_prompt(
        self, prompts: list[str], outputs_per_prompt: int, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 sequence embeddings [B*k, L, D], pooled CLIP embeddings [B*k, D_pool])."""
        clip_ids = self._tokenize(self.tokenizer, prompts, self.clip_max_length)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output.to(self.dtype)
        t5_ids = self._tokenize(self.tokenizer_2, prompts, max_sequence_length)
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0].to(self.dtype)
        return (
            embeds.repeat_interleave(outputs_per_prompt, dim=0),
            pooled.repeat_interleave(outputs_per_prompt, dim=0),
        )

    def prepare_latents(
        self, seeds: list[int], outputs_per_prompt: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        latent_h, latent_w = self._latent_size(height, width)
        channels = self.transformer.config.in_channels // 4
        noise = seeded_noise(seeds, outputs_per_prompt, (channels, latent_h, latent_w), self.device, self.dtype)
        return pack_latents(noise), latent_image_ids(latent_h, latent_w, self.device)

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.size_multiple
        return 2 * (height // m), 2 * (width // m)

    def prepare_timesteps(self, num_inference_steps: int, image_seq_len: int) -> torch.Tensor:
        sigmas = None if self.scheduler.config.get("use_flow_sigmas") else default_sigmas(num_inference_steps)
        mu = shift_from_scheduler_config(self.scheduler, image_seq_len)
        return set_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)

    def strength_timesteps(self, timesteps: torch.Tensor, num_inference_steps: int, strength: float) -> torch.Tensor:
        """Image-to-image starts part-way: keep the last `strength` of the schedule."""
        start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        if start >= len(timesteps):
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising step; "
                f"raise either"
            )
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

    def forward(self, req: OmniDiffusionRequest) -> DiffusionOutput:
        sp = req.sampling_params
        guidance_distilled = self.transformer.config.guidance_embeds
        images = self.input_images(req)
        default_height, default_width = self.default_size_for(images)
        height = sp.height or default_height
        width = sp.width or default_width
        steps = sp.num_inference_steps or (28 if guidance_distilled else 4)
        max_sequence_length = sp.max_sequence_length or self.max_sequence_length
        self.check_inputs(req, height, width, max_sequence_length)
        k = sp.num_outputs_per_prompt
        timer = StageTimer(self.device)

        # Prompts without their own negative prompt get "" when any prompt of the batch has one.
        do_true_cfg = sp.true_cfg_scale > 1 and any(n is not None for n in req.negative_prompt_texts)
        with timer.stage("encode"):
            embeds, pooled = self.encode_prompt(req.prompt_texts, k, max_sequence_length)
            text_ids = torch.zeros(embeds.shape[1], 3, device=self.device)
            if do_true_cfg:
                negatives = [n or "" for n in req.negative_prompt_texts]
                neg_embeds, neg_pooled = self.encode_prompt(negatives, k, max_sequence_length)

        with timer.stage("denoise"):
            if images is None:
                latents, img_ids = self.prepare_latents(req.seeds, k, height, width)
                timesteps = self.prepare_timesteps(steps, latents.shape[1])
            else:
                latent_h, latent_w = self._latent_size(height, width)
                timesteps = self.prepare_timesteps(steps, (latent_h // 2) * (latent_w // 2))
                strength = self.default_strength if sp.strength is None else sp.strength
                timesteps = self.strength_timesteps(timesteps, steps, strength)
                latents, img_ids = self.prepare_image_latents(images, req.seeds, k, height, width, timesteps[:1])
            guidance = None
            if guidance_distilled:
                scale = 3.5 if sp.guidance_scale is None else sp.guidance_scale
                guidance = torch.full([latents.shape[0]], scale, device=self.device, dtype=torch.float32)
            common = {"guidance": guidance, "txt_ids": text_ids, "img_ids": img_ids}
            positive = {**common, "encoder_hidden_states": embeds, "pooled_projections": pooled}
            negative = (
                {**common, "encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled}
                if do_true_cfg
                else None
            )
            latents = denoise(self, latents, timesteps, positive, negative, sp.true_cfg_scale)

        if sp.output_type == "latent":
            return DiffusionOutput(output=latents, metrics=timer.timings)
        with timer.stage("decode"):
            images = self.decode_latents(latents, height, width)
        return DiffusionOutput(output=images, metrics={**timer.timings, "num_inference_steps": len(timesteps)})

    def load_weights(self, weights) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)
