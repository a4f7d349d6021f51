"""Qwen-Image-Edit (one input image) and Qwen-Image-Edit-2509/2511 ("Plus": several input images).

Each input image reaches the model twice:
- through the text encoder's vision tower, inside the prompt's chat template (Qwen2.5-VL reads the
  image and the instruction together);
- as VAE latents, resized to about 1024 x 1024 pixels at the image's aspect ratio, appended after the
  noisy image's tokens as reference tokens (with their own patch grids in `img_shapes`); only the
  noisy image's tokens are denoised.

Without a height/width the output takes the aspect ratio of the first (Edit) or last (Plus) input
image at about `max_area` pixels (default 1024 x 1024), as the reference pipelines compute it (spec:
`size_from_aspect_ratio`, `area_rounding`). Everything else is QwenImagePipeline's.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import repeat_per_output
from diffserve.models.flux.pipeline_flux import pack_latents
from diffserve.models.interface import SupportImageInput
from diffserve.models.outputs import vae_latent_statistics
from diffserve.models.qwen_image.pipeline_qwen_image import QwenImagePipeline
from diffserve.models.qwen_image.processor import load_qwen2vl_processor
from diffserve.models.spec import ImageInputSpec, SamplingSpec, size_at_area
from diffserve.request import OmniDiffusionRequest

# The reference images are VAE-encoded at about this many pixels, whatever the output size, which
# takes the same area by default; sides are rounded to multiples of 32, as the reference does.
REFERENCE_AREA = 1024 * 1024
AREA_ROUNDING = 32
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"


class QwenImageEditPipeline(QwenImagePipeline, SupportImageInput):
    _encoder_modules: ClassVar[list[str]] = ["text_encoder"]

    prompt_template: ClassVar[str] = (
        "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
        "background), then explain how the user's text instruction should alter or modify the image. Generate a "
        "new image that meets the user's requirements while maintaining consistency with the original input "
        "where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    )
    template_prefix_tokens: ClassVar[int] = 64
    # How many images a prompt may bring, which one sizes the output, and at what area the text
    # encoder sees them (Edit: the reference size itself).
    max_images: ClassVar[int] = 1
    sizing_image: ClassVar[int] = 0
    vision_area: ClassVar[int] = REFERENCE_AREA

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        from diffusers.image_processor import VaeImageProcessor

        self.processor = load_qwen2vl_processor(f"{od_config.model}/processor")
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.size_multiple)

    def sampling_spec(self) -> SamplingSpec:
        images = ImageInputSpec(
            max_per_prompt=self.max_images,
            required=True,
            # Without height/width: the sizing image's aspect ratio at max_area pixels.
            params=frozenset({"max_area"}),
            size_from_image=True,
            size_from_aspect_ratio=True,
            size_image=self.sizing_image,
            area_rounding=AREA_ROUNDING,
            # Every input keeps its aspect ratio at about 1024 x 1024 pixels: the reference tokens'
            # grid follows it, so inputs used at one size share a batch.
            input_area=REFERENCE_AREA,
            tokens_in_sequence=True,
        )
        return SamplingSpec(
            modality="image",
            params=frozenset({"height", "width", "num_inference_steps", "true_cfg_scale"}),
            defaults={"num_inference_steps": 50, "true_cfg_scale": 4.0, "max_area": REFERENCE_AREA},
            cfg="true_cfg",
            images=images,
            size_multiple=self.size_multiple,
        )

    # -- the vision-language prompt -----------------------------------------------------------------

    def vision_prompt(self, prompt: str, image_count: int) -> str:
        """The user turn of the template: the image's vision tokens, then the instruction."""
        return VISION_TOKENS + prompt

    def text_encoder_inputs(self, prompts: list[str], images: list | None, max_sequence_length: int | None):
        # Every prompt of a batch brings as many images (admission); they follow the prompts' order.
        per_prompt = len(images) // len(prompts)
        texts = [self.prompt_template.format(self.vision_prompt(p, per_prompt)) for p in prompts]
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt")

    # -- reference images ---------------------------------------------------------------------------

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized VAE latents (the posterior's mode) of [P, 3, 1, H, W] pixels, one image at a time."""
        latents = torch.cat([self.vae.encode(pixels[i : i + 1]).latent_dist.mode() for i in range(len(pixels))])
        mean, std = vae_latent_statistics(self.vae, latents.device)
        return (latents - mean.to(latents.dtype)) / std.to(latents.dtype)

    def prepare_references(self, req: OmniDiffusionRequest):
        """(the images the text encoder sees, prompt-major; the packed reference latents [P*k, S_ref, C];
        their patch grids). Admission made every prompt's images used at the same sizes."""
        sp = req.sampling_params
        per_prompt = [p.images for p in req.prompts]
        vision_images, latents, shapes = [], [], []
        for j, first in enumerate(per_prompt[0]):
            width, height = self.spec.input_image_size(first.size, sp)
            pixels = self.image_processor.preprocess([images[j] for images in per_prompt], height, width)
            pixels = pixels[:, :, None].to(self.device, self.vae.dtype)  # one frame
            latents.append(pack_latents(self.encode_reference(pixels)[:, :, 0]).to(self.dtype))
            shapes.append((1, *self.latent_grid(height, width)))
        for images in per_prompt:
            for image in images:
                width, height = size_at_area(*image.size, self.vision_area, AREA_ROUNDING)
                vision_images.append(self.image_processor.resize(image, height, width))
        return vision_images, repeat_per_output(torch.cat(latents, dim=1), sp.num_outputs_per_prompt), shapes


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Several input images per prompt, each named in the prompt ("Picture 1: ..."); the text encoder
    sees them at about 384 x 384 pixels, the transformer at about 1024 x 1024; the last one sizes the
    output."""

    # Qwen-Image-Edit-2509/2511 are trained and documented for one to three input images; diffusers'
    # pipeline sets no limit (more images mean more reference tokens in every attention).
    max_images: ClassVar[int] = 3
    sizing_image: ClassVar[int] = -1
    vision_area: ClassVar[int] = 384 * 384

    def vision_prompt(self, prompt: str, image_count: int) -> str:
        pictures = "".join(f"Picture {i + 1}: {VISION_TOKENS}" for i in range(image_count))
        return pictures + prompt
