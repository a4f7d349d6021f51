"""Wan image-to-video: each prompt brings one image that becomes the first frame.

- Wan2.1 I2V (480p/720p): the image is encoded twice, by CLIP (tokens the transformer cross-attends
  to) and by the VAE as the first frame of an otherwise black video; that latent video plus a mask
  marking the known frame are concatenated to the noise channels.
- Wan2.2 I2V-A14B: the same latent conditioning without CLIP, and two experts as in text-to-video.
- Wan2.2 TI2V-5B (`expand_timesteps`): the image's latent replaces the first latent frame, whose
  tokens get timestep 0 while the others are denoised.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import repeat_per_output
from diffserve.models.spec import ImageInputSpec, SamplingSpec
from diffserve.models.wan.pipeline_wan import WanPipeline, _component_present, _load_model_index
from diffserve.request import OmniDiffusionRequest, OmniDiffusionSamplingParams


class WanImageToVideoPipeline(WanPipeline):
    _encoder_modules: ClassVar[list[str]] = ["text_encoder", "image_encoder"]

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        import transformers
        from diffusers.video_processor import VideoProcessor

        path = od_config.model
        index = _load_model_index(od_config)
        self.image_encoder = self.image_processor = None
        if _component_present(index, "image_encoder"):
            self.image_encoder = transformers.CLIPVisionModel.from_pretrained(
                path, subfolder="image_encoder", dtype=od_config.torch_dtype
            )
            processor_cls = getattr(transformers, index["image_processor"][1])
            self.image_processor = processor_cls.from_pretrained(path, subfolder="image_processor")
        else:
            self._encoder_modules = ["text_encoder"]
        if (self.image_encoder is not None) != self.transformer.has_image_input:
            raise ValueError(
                f"{path}: the transformer's image_dim ({self.transformer.config.image_dim}) needs a CLIP "
                "image_encoder exactly when it is set"
            )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    def sampling_spec(self) -> SamplingSpec:
        # Each prompt's image, resized to the video's size, becomes the first frame.
        images = ImageInputSpec(max_per_prompt=1, required=True, resized_to_output=True)
        return super().sampling_spec().replace(images=images)

    # -- conditioning -------------------------------------------------------------------------------

    def encode_image(self, images: list) -> torch.Tensor:
        """CLIP tokens [P, L_img, D_img] from the penultimate layer (Wan2.1)."""
        encoder = self.image_encoder
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=encoder.dtype)
        return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def encode_first_frames(self, images: list, sp: OmniDiffusionSamplingParams, as_video: bool) -> torch.Tensor:
        """Normalized VAE latents of each image as the first frame: [P, C, F_lat, h, w] for a video
        whose other frames are black (`as_video`), else [P, C, 1, h, w]."""
        pixels = self.video_processor.preprocess(images, height=sp.height, width=sp.width)
        pixels = pixels.to(self.device, dtype=torch.float32)[:, :, None]
        if as_video:
            rest = pixels.new_zeros(pixels.shape[0], pixels.shape[1], sp.num_frames - 1, *pixels.shape[3:])
            pixels = torch.cat([pixels, rest], dim=2)
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode().to(torch.float32)
        mean, inv_std = self.latent_statistics()
        return (latents - mean) * inv_std

    def prepare_conditioning(self, req: OmniDiffusionRequest, shape: tuple[int, ...]):
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        images = [prompt.images[0].convert("RGB") for prompt in req.prompts]
        shared: dict[str, Any] = {}
        if self.image_encoder is not None:
            tokens = repeat_per_output(self.encode_image(images), k)
            shared["encoder_hidden_states_image"] = tokens.to(self.device, self.dtype)

        _, frames, height, width = shape
        if self.expand_timesteps:
            # The first latent frame is the image, kept clean (mask 0, timestep 0); the rest is denoised.
            image_latents = repeat_per_output(self.encode_first_frames(images, sp, as_video=False), k)
            mask = torch.ones(1, 1, frames, height, width, device=self.device)
            mask[:, :, 0] = 0
            return shared, {"image_latents": image_latents, "mask": mask}

        # A mask channel per VAE temporal frame; only the first latent frame (the image) is known.
        video_latents = self.encode_first_frames(images, sp, as_video=True)
        mask = torch.zeros(len(images), self.vae_scale_factor_temporal, frames, height, width, device=self.device)
        mask[:, :, 0] = 1
        condition = repeat_per_output(torch.cat([mask, video_latents], dim=1), k)
        return shared, {"condition": condition}

    def _blend_first_frame(self, latents: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        mask = cond["mask"]
        return (1 - mask) * cond["image_latents"] + mask * latents

    def transformer_inputs(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        if not self.expand_timesteps:
            return {
                "hidden_states": torch.cat([latents, cond["condition"]], dim=1).to(self.dtype),
                "timestep": t.expand(latents.shape[0]),
            }
        _, p_h, p_w = self.transformer.config.patch_size
        token_mask = cond["mask"][0, 0, :, ::p_h, ::p_w].flatten()
        return {
            "hidden_states": self._blend_first_frame(latents, cond).to(self.dtype),
            "timestep": (token_mask * t).expand(latents.shape[0], -1),
        }

    def finalize_latents(self, latents: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self._blend_first_frame(latents, cond) if self.expand_timesteps else latents
