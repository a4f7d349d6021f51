"""FLUX.1 Kontext: image editing with the FLUX.1 transformer, as diffusers' FluxKontextPipeline.

Each prompt's image is resized to the Kontext training size nearest its aspect ratio (or, with
`auto_resize=False`, kept at its own size rounded down to a multiple of 16), VAE-encoded and packed
into reference tokens. They follow the noisy latents' tokens in the transformer's image sequence, with
position ids whose first component is 1 (0 for the noisy tokens), and the prediction keeps only the
noisy tokens. With no height/width the output takes the input image's aspect ratio at about
`max_area` pixels. Without an image it is FLUX.1 text-to-image.
"""

from __future__ import annotations

from typing import Any

import torch

from diffserve.models.base import repeat_per_output
from diffserve.models.flux.pipeline_flux import FluxPipeline, latent_image_ids, pack_latents
from diffserve.models.spec import ImageInputSpec, SamplingSpec
from diffserve.request import OmniDiffusionRequest, OmniDiffusionSamplingParams

# (width, height) sizes FLUX.1 Kontext was trained at, about one megapixel each, from 1:2.33 to 2.33:1.
KONTEXT_SIZES = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)
# The reference tokens' first position-id component; the noisy latents' is 0.
REFERENCE_POSITION_INDEX = 1


class FluxKontextPipeline(FluxPipeline):
    # The reference latents have a batch dimension like the noisy ones.
    cfg_batched_inputs = FluxPipeline.cfg_batched_inputs + ("reference_latents",)

    def sampling_spec(self) -> SamplingSpec:
        flux = super().sampling_spec()
        defaults = {name: value for name, value in flux.defaults.items() if name != "strength"}
        if "guidance_scale" in flux.params:
            defaults["guidance_scale"] = 2.5
        # The default output size's area: 1024 * 1024 for the real VAE (factor 8).
        defaults.update(max_area=flux.defaults["height"] * flux.defaults["width"], auto_resize=True)
        images = ImageInputSpec(
            max_per_prompt=1,
            params=frozenset({"max_area", "auto_resize"}),
            size_from_image=True,
            size_from_aspect_ratio=True,
            preferred_sizes=KONTEXT_SIZES,
            tokens_in_sequence=True,
        )
        return flux.replace(defaults=defaults, images=images)

    # -- stages -------------------------------------------------------------------------------------

    def prepare_reference_latents(
        self, images: list, outputs_per_prompt: int, sp: OmniDiffusionSamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt's image as packed latents [P*k, S_ref, C] and their position ids [S_ref, 3].

        The latents are the VAE posterior's mode, so encoding draws no noise. Admission made every image
        of the request resolve to the same size.
        """
        width, height = self.spec.input_image_size(images[0].size, sp)
        # The VAE takes RGB; edited images are often RGBA or greyscale PNGs.
        images = [image.convert("RGB") for image in images]
        pixels = self.image_processor.preprocess(images, height=height, width=width)
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        config = self.vae.config
        latents = self.vae.encode(pixels).latent_dist.mode()
        latents = ((latents - config.shift_factor) * config.scaling_factor).to(self.dtype)
        ids = latent_image_ids(*latents.shape[2:], self.device)
        ids[:, 0] = REFERENCE_POSITION_INDEX
        return repeat_per_output(pack_latents(latents), outputs_per_prompt), ids

    def prepare_denoise(self, req: OmniDiffusionRequest) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Noise as FLUX text-to-image (the schedule's shift follows the noisy tokens alone), plus the
        reference latents and position ids for both token groups."""
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        latents, img_ids = self.prepare_latents(req.seeds, k, sp.height, sp.width)
        timesteps = self.prepare_timesteps(sp.num_inference_steps, latents.shape[1])
        if not req.prompts[0].images:
            return latents, timesteps, {"img_ids": img_ids}
        reference, reference_ids = self.prepare_reference_latents([p.images[0] for p in req.prompts], k, sp)
        return latents, timesteps, {"img_ids": torch.cat([img_ids, reference_ids]), "reference_latents": reference}

    def predict_noise(self, reference_latents: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if reference_latents is None:
            return self.transformer(**kwargs)
        # The reference tokens extend the image sequence; only the noisy tokens' prediction is used.
        noisy = kwargs["hidden_states"]
        kwargs["hidden_states"] = torch.cat([noisy, reference_latents], dim=1)
        return self.transformer(**kwargs)[:, : noisy.shape[1]]
