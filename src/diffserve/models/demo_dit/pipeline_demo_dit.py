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

from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import DiffusionPipelineBase, PipelineRun, repeat_per_output
from diffserve.models.demo_dit import captions
from diffserve.models.demo_dit.configs import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DemoDiTConfig,
    DemoTextEncoderConfig,
)
from diffserve.models.demo_dit.demo_dit_transformer import DemoDiTTransformer2DModel
from diffserve.models.demo_dit.text_encoder import DemoTextEncoder
from diffserve.models.denoise import DenoiseState
from diffserve.models.flow_match import default_sigmas, set_timesteps
from diffserve.models.outputs import denormalize_images, seeded_noise
from diffserve.models.spec import SamplingSpec
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)


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


class DiffservePixelDiTPipeline(DiffusionPipelineBase):
    supports_step_batching: ClassVar[bool] = True
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
        super().__init__(od_config=od_config, prefix=prefix)
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import PreTrainedTokenizerFast

        path = od_config.model
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(path, "tokenizer"))
        transformer_config = DemoDiTConfig.from_pretrained(os.path.join(path, "transformer"))
        text_config = DemoTextEncoderConfig.from_pretrained(os.path.join(path, "text_encoder"))
        if text_config.hidden_size != transformer_config.text_dim:
            raise ValueError(
                f"{path}: the text encoder's hidden_size ({text_config.hidden_size}) differs from the "
                f"transformer's text_dim ({transformer_config.text_dim})"
            )
        self.add_checkpoint_module("transformer", DemoDiTTransformer2DModel, transformer_config, fall_back_to_pt=False)
        self.add_checkpoint_module("text_encoder", DemoTextEncoder, text_config, fall_back_to_pt=False)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def sampling_spec(self) -> SamplingSpec:
        size = self.transformer.config.sample_size
        max_length = self.text_encoder.config.max_length
        return SamplingSpec(
            modality="image",
            params=frozenset({"height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length"}),
            # The checkpoint states the settings it was tuned for (model_index.json _diffserve_defaults).
            defaults={"height": size, "width": size, "num_inference_steps": DEFAULT_NUM_INFERENCE_STEPS,
                      "guidance_scale": DEFAULT_GUIDANCE_SCALE, "max_sequence_length": max_length},
            cfg="guidance",
            # Trained at sample_size; RoPE lets it run smaller or larger, within reason.
            size_multiple=self.patch_size,
            min_side=4 * self.patch_size,
            max_side=4 * size,
            max_sequence_length=max_length,
        )

    # -- stages -------------------------------------------------------------------------------------

    def _tokenize(self, prompts: list[str], max_length: int) -> torch.Tensor:
        for prompt in dict.fromkeys(prompts):
            unknown = captions.unknown_words(self.tokenizer, prompt)
            if unknown:
                known = sorted(w for w in self.tokenizer.get_vocab() if not w.startswith("["))
                logger.warning(
                    "the demo model does not know the word(s) %s in %r and ignores them; it knows: %s",
                    ", ".join(map(repr, unknown)), prompt, " ".join(known),
                )
        normalized = [captions.normalize_caption(p) for p in prompts]
        return self.tokenize(self.tokenizer, normalized, max_length).input_ids.to(self.device)

    def encode_prompt(
        self, prompts: list[str], outputs_per_prompt: int, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text hidden states [B*k, L, D], pooled [B*k, D])."""
        hidden, pooled = self.text_encoder(self._tokenize(prompts, max_sequence_length))
        return repeat_per_output(hidden, outputs_per_prompt), repeat_per_output(pooled, outputs_per_prompt)

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

    # -- the whole call: begin + denoise (DiffusionPipelineBase.forward) + finish ------------------

    def begin(self, req: OmniDiffusionRequest) -> PipelineRun:
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        timer = self.stage_timer()
        # Classic CFG: the negative branch is each prompt's negative prompt, or "" (the unconditional
        # caption the model was trained with).
        do_cfg = self.cfg_enabled(req)
        with timer.stage("encode"):
            text, pooled = self.encode_prompt(req.prompt_texts, k, sp.max_sequence_length)
            if do_cfg:
                neg_text, neg_pooled = self.encode_prompt(self.negative_prompts(req), k, sp.max_sequence_length)

        with timer.stage("prepare"):
            latents, img_ids = self.prepare_latents(req.seeds, k, sp.height, sp.width)
            timesteps = self.prepare_timesteps(sp.num_inference_steps)
            txt_ids = torch.zeros(text.shape[1], 2, device=self.device)
            common = {"img_ids": img_ids, "txt_ids": txt_ids}
            positive = {**common, "encoder_hidden_states": text, "pooled_projections": pooled}
            negative = (
                {**common, "encoder_hidden_states": neg_text, "pooled_projections": neg_pooled} if do_cfg else None
            )
        state = DenoiseState.build(self, latents, timesteps, positive, negative, sp.guidance_scale)
        return PipelineRun(req, state, timer)

    def finish(self, run: PipelineRun) -> DiffusionOutput:
        sp = run.req.sampling_params
        height, width, timer = sp.height, sp.width, run.timer
        metrics = {"num_inference_steps": sp.num_inference_steps, "guidance_scale": sp.guidance_scale}
        if sp.output_type == "latent":
            return DiffusionOutput(
                output=unpatchify(run.state.latents, height, width, self.patch_size),
                metrics={**timer.timings, **metrics},
            )
        with timer.stage("decode"):
            images = self.decode_latents(run.state.latents, height, width)
        return DiffusionOutput(output=images, metrics={**timer.timings, **metrics})
