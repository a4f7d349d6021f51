"""The built-in demo model: text-to-image in pixel space with classifier-free guidance.

A custom (non-diffusers) model, integrated like every other one: a transformer and a text encoder of
our own built from `diffserve.layers`, both streamed from safetensors by the loader (two
ComponentSources), a transformers tokenizer and diffusers' FlowMatchEulerDiscreteScheduler. There is
no VAE: the denoiser works on 4x4 pixel patches directly. Trained by `scripts/train_demo_model.py`
on scenes of coloured shapes (see `scenes.py`); the weights ship in `diffserve/assets/demo_model`.
"""

from __future__ import annotations

import logging
import os
from typing import ClassVar

import torch
import torch.nn as nn

from diffserve.config import OmniDiffusionConfig
from diffserve.distributed.cfg_parallel import CFGParallelMixin
from diffserve.loader import AutoWeightsLoader, DiffusersPipelineLoader
from diffserve.models.demo_dit.configs import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DemoDiTConfig,
    DemoTextEncoderConfig,
)
from diffserve.models.demo_dit import scenes
from diffserve.models.demo_dit.demo_dit_transformer import DemoDiTTransformer2DModel
from diffserve.models.demo_dit.text_encoder import DemoTextEncoder
from diffserve.models.flow_match import default_sigmas, set_timesteps
from diffserve.models.denoise import denoise
from diffserve.models.interface import SupportsComponentDiscovery
from diffserve.models.outputs import denormalize_images, image_post_process, seeded_noise
from diffserve.models.progress_bar import ProgressBarMixin
from diffserve.models.stage_timer import StageTimer
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)


def get_demo_dit_post_process_func(od_config: OmniDiffusionConfig):
    return image_post_process


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p]: each p x p patch becomes one token, row-major."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of patchify for an image of height x width pixels."""
    b, _, channels = tokens.shape
    p = patch_size
    c = channels // (p * p)
    x = tokens.reshape(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, patch_size: int, device: torch.device) -> torch.Tensor:
    """(row, column) of each patch token [(H/p)(W/p), 2]."""
    rows, cols = torch.meshgrid(
        torch.arange(height // patch_size, device=device),
        torch.arange(width // patch_size, device=device),
        indexing="ij",
    )
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2).float()


class DiffservePixelDiTPipeline(nn.Module, CFGParallelMixin, ProgressBarMixin, SupportsComponentDiscovery):
    _dit_modules: ClassVar[list[str]] = ["transformer"]
    _encoder_modules: ClassVar[list[str]] = ["text_encoder"]
    _vae_modules: ClassVar[list[str]] = []  # pixel space: nothing to decode
    # Per-sample transformer inputs: without CFG parallelism both branches run as one batch.
    cfg_batched_inputs: ClassVar[tuple[str, ...]] = (
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "pooled_projections",
    )

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__()
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import PreTrainedTokenizerFast

        self.od_config = od_config
        path, dtype = od_config.model, od_config.torch_dtype
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(path, "tokenizer"))
        transformer_config = DemoDiTConfig.from_pretrained(os.path.join(path, "transformer"))
        text_config = DemoTextEncoderConfig.from_pretrained(os.path.join(path, "text_encoder"))
        if text_config.hidden_size != transformer_config.text_dim:
            raise ValueError(
                f"{path}: the text encoder's hidden_size ({text_config.hidden_size}) differs from the "
                f"transformer's text_dim ({transformer_config.text_dim})"
            )
        with torch.device("meta"):  # weights come from weights_sources
            self.transformer = DemoDiTTransformer2DModel(transformer_config, od_config=od_config).to(dtype)
            self.text_encoder = DemoTextEncoder(text_config, od_config=od_config).to(dtype)
        self.weights_sources = [
            DiffusersPipelineLoader.ComponentSource(
                model_or_path=path, subfolder="transformer", prefix="transformer.", fall_back_to_pt=False
            ),
            DiffusersPipelineLoader.ComponentSource(
                model_or_path=path, subfolder="text_encoder", prefix="text_encoder.", fall_back_to_pt=False
            ),
        ]
        index = od_config.model_config
        self.default_num_inference_steps = int(index.get("default_num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS))
        self.default_guidance_scale = float(index.get("default_guidance_scale", DEFAULT_GUIDANCE_SCALE))
        self.set_progress_bar_config(disable=od_config.disable_progress_bar)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def max_sequence_length(self) -> int:
        return self.text_encoder.config.max_length

    # -- defaults and checks ------------------------------------------------------------------------

    def default_size(self) -> int:
        return self.transformer.config.sample_size

    def size_limits(self) -> tuple[int, int]:
        # Trained at sample_size; RoPE lets it run smaller or larger, within reason.
        return 4 * self.patch_size, 4 * self.default_size()

    def check_inputs(self, req: OmniDiffusionRequest, height: int, width: int, max_sequence_length: int) -> None:
        m = self.patch_size
        low, high = self.size_limits()
        for name, value in (("height", height), ("width", width)):
            if value % m or not low <= value <= high:
                raise ValueError(
                    f"{name}={value} is not supported: it must be a multiple of {m} between {low} and {high} "
                    f"(the model was trained at {self.default_size()}x{self.default_size()})"
                )
        if max_sequence_length > self.max_sequence_length:
            raise ValueError(
                f"max_sequence_length={max_sequence_length} exceeds the text encoder's "
                f"{self.max_sequence_length} tokens"
            )
        if req.sampling_params.true_cfg_scale != 1.0:
            raise ValueError(
                f"true_cfg_scale={req.sampling_params.true_cfg_scale} is not used by this model: it runs "
                "classifier-free guidance with guidance_scale (> 1 turns it on; negative_prompt optional)"
            )
        if not req.prompts:
            raise ValueError("a request needs at least one prompt")

    # -- stages -------------------------------------------------------------------------------------

    def _tokenize(self, prompts: list[str], max_length: int) -> torch.Tensor:
        ids, lengths = scenes.tokenize(self.tokenizer, prompts, max_length, return_lengths=True)
        if max(lengths) > max_length:
            logger.warning("prompt truncated to %d tokens (it had %d)", max_length, max(lengths))
        return ids.to(self.device)

    def encode_prompt(
        self, prompts: list[str], outputs_per_prompt: int, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text hidden states [B*k, L, D], pooled [B*k, D])."""
        hidden, pooled = self.text_encoder(self._tokenize(prompts, max_sequence_length))
        return hidden.repeat_interleave(outputs_per_prompt, dim=0), pooled.repeat_interleave(outputs_per_prompt, dim=0)

    def prepare_latents(
        self, seeds: list[int], outputs_per_prompt: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded pixel noise, patchified: ([B*k, S_img, C*p*p], image ids [S_img, 2])."""
        channels = self.transformer.config.in_channels
        noise = seeded_noise(seeds, outputs_per_prompt, (channels, height, width), self.device, self.dtype)
        return patchify(noise, self.patch_size), image_ids(height, width, self.patch_size, self.device)

    def prepare_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return set_timesteps(
            self.scheduler, num_inference_steps, self.device, sigmas=default_sigmas(num_inference_steps)
        )

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Patch tokens in [-1, 1] -> float images [B, C, H, W] in [0, 1]."""
        return denormalize_images(unpatchify(latents, height, width, self.patch_size))

    # -- the whole call -----------------------------------------------------------------------------

    def forward(self, req: OmniDiffusionRequest) -> DiffusionOutput:
        sp = req.sampling_params
        height = sp.height or self.default_size()
        width = sp.width or self.default_size()
        steps = sp.num_inference_steps or self.default_num_inference_steps
        guidance_scale = self.default_guidance_scale if sp.guidance_scale is None else sp.guidance_scale
        max_sequence_length = sp.max_sequence_length or self.max_sequence_length
        self.check_inputs(req, height, width, max_sequence_length)
        k = sp.num_outputs_per_prompt
        timer = StageTimer(self.device)

        # Classic CFG: the negative branch is each prompt's negative prompt, or "" (the unconditional
        # caption the model was trained with).
        do_cfg = guidance_scale > 1
        with timer.stage("encode"):
            text, pooled = self.encode_prompt(req.prompt_texts, k, max_sequence_length)
            if do_cfg:
                negatives = [n or "" for n in req.negative_prompt_texts]
                neg_text, neg_pooled = self.encode_prompt(negatives, k, max_sequence_length)

        with timer.stage("denoise"):
            latents, img_ids = self.prepare_latents(req.seeds, k, height, width)
            timesteps = self.prepare_timesteps(steps)
            txt_ids = torch.zeros(text.shape[1], 2, device=self.device)
            common = {"img_ids": img_ids, "txt_ids": txt_ids}
            positive = {**common, "encoder_hidden_states": text, "pooled_projections": pooled}
            negative = (
                {**common, "encoder_hidden_states": neg_text, "pooled_projections": neg_pooled} if do_cfg else None
            )
            latents = denoise(self, latents, timesteps, positive, negative, guidance_scale)

        metrics = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
        if sp.output_type == "latent":
            return DiffusionOutput(
                output=unpatchify(latents, height, width, self.patch_size), metrics={**timer.timings, **metrics}
            )
        with timer.stage("decode"):
            images = self.decode_latents(latents, height, width)
        return DiffusionOutput(output=images, metrics={**timer.timings, **metrics})

    def load_weights(self, weights) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)
