"""Qwen-Image text-to-image, and the stages the editing pipelines (pipeline_qwen_image_edit.py) share
with it.

The prompt goes through Qwen2.5-VL inside a chat template; the embeddings of the template's fixed
prefix are dropped, the rest (the prompt, then the template's closing tokens) conditions the MMDiT.
Prompts of one batch are padded to the longest and the padding is masked in attention. True
classifier-free guidance runs when a negative prompt is given (`true_cfg_scale`, 4.0 by default as in
diffusers), and the guided prediction is rescaled to the norm of the conditional one, per token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import DiffusionPipelineBase, PipelineRun, repeat_per_output
from diffserve.models.denoise import DenoiseState, flow_step_inputs
from diffserve.models.flow_match import default_sigmas, set_timesteps, shift_from_scheduler_config
from diffserve.models.flux.pipeline_flux import pack_latents, unpack_latents
from diffserve.models.outputs import denormalize_images, seeded_noise, vae_latent_statistics
from diffserve.models.qwen_image.qwen_image_transformer import (
    QwenImageTransformer2DModel,
    QwenImageTransformerConfig,
)
from diffserve.models.spec import SamplingSpec
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)

# The longest prompt embedding the reference pipeline accepts (tokens after the template's prefix).
TEXT_TOKEN_LIMIT = 1024


@dataclass
class PromptEmbeds:
    """Padded prompt embeddings [N, L, D] and their mask [N, L] (True = a real token), None when no
    position is padding (attention then takes the unmasked path)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None

    def transformer_kwargs(self) -> dict[str, Any]:
        return {"encoder_hidden_states": self.embeds, "encoder_hidden_states_mask": self.mask}


def pad_prompt_embeds(sequences: list[torch.Tensor], length: int, outputs_per_prompt: int) -> PromptEmbeds:
    """Per-prompt embeddings [L_i, D] -> PromptEmbeds of `length` tokens (zeros after each prompt),
    each prompt repeated `outputs_per_prompt` times."""
    embeds = torch.stack([torch.cat([s, s.new_zeros(length - len(s), s.shape[1])]) for s in sequences])
    mask = None
    if any(len(s) < length for s in sequences):
        # Built on the CPU from the known lengths: no device sync.
        mask = torch.tensor([[i < len(s) for i in range(length)] for s in sequences]).to(embeds.device)
        mask = repeat_per_output(mask, outputs_per_prompt)
    return PromptEmbeds(repeat_per_output(embeds, outputs_per_prompt), mask)


class QwenImagePipeline(DiffusionPipelineBase):
    _encoder_modules: ClassVar[list[str]] = ["text_encoder"]
    _vae_modules: ClassVar[list[str]] = ["vae"]
    # Both CFG branches run as one batch when their prompt embeddings have one length (they are
    # padded to a common one, see prompt_kwargs).
    cfg_batched_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_mask")
    supports_step_batching: ClassVar[bool] = True
    # Requests stepped together pad their prompts to the longest, as the prompts of one request are.
    step_padded_inputs: ClassVar[dict[str, str]] = {"encoder_hidden_states": "encoder_hidden_states_mask"}

    # The chat template the prompt is embedded in, and how many of its leading tokens (the system
    # prompt) are dropped from the embeddings, as the reference pipeline does.
    prompt_template: ClassVar[str] = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    template_prefix_tokens: ClassVar[int] = 34

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        path, dtype = od_config.model, od_config.torch_dtype
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        self.vae = AutoencoderKLQwenImage.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype
        )
        self.tokenizer = Qwen2Tokenizer.from_pretrained(path, subfolder="tokenizer")

        config = QwenImageTransformerConfig.from_pretrained(f"{path}/transformer")
        self.add_checkpoint_module("transformer", QwenImageTransformer2DModel, config)
        # Each temporal-downsample entry of the config is one spatial 2x downsampling.
        self.vae_scale_factor = 2 ** len(self.vae.config.temperal_downsample)

    def sampling_spec(self) -> SamplingSpec:
        size = 128 * self.vae_scale_factor  # 1024 for the released 8x VAE, as in the reference
        return SamplingSpec(
            modality="image",
            params=frozenset({"height", "width", "num_inference_steps", "true_cfg_scale", "max_sequence_length"}),
            defaults={"height": size, "width": size, "num_inference_steps": 50, "true_cfg_scale": 4.0,
                      "max_sequence_length": 512},
            cfg="true_cfg",
            size_multiple=self.size_multiple,
            max_sequence_length=TEXT_TOKEN_LIMIT,
        )

    @property
    def size_multiple(self) -> int:
        # The VAE downsamples by vae_scale_factor and latents are packed in 2x2 patches.
        return self.vae_scale_factor * 2

    # -- text ---------------------------------------------------------------------------------------

    def text_encoder_inputs(self, prompts: list[str], images: list | None, max_sequence_length: int | None):
        """The text encoder's inputs (a BatchEncoding on the CPU) for the templated prompts."""
        texts = [self.prompt_template.format(p) for p in prompts]
        # Qwen2.5-VL is causal: cutting the input after max_sequence_length prompt tokens gives the same
        # embeddings as the reference, which encodes up to 1024 and cuts the embeddings.
        return self.tokenize(
            self.tokenizer, texts, max_sequence_length + self.template_prefix_tokens, padding="longest"
        )

    def encode_prompt(
        self, prompts: list[str], images: list | None, max_sequence_length: int | None
    ) -> list[torch.Tensor]:
        """Per prompt, the last hidden states of its tokens after the template's prefix, [L_i, D]."""
        inputs = self.text_encoder_inputs(prompts, images, max_sequence_length)
        # The execution device: under CPU offload the encoder's weights may still be on the host.
        device = self.device
        mask = inputs["attention_mask"]
        # The language model's last hidden state is what the reference takes (the LM head is not needed).
        hidden = self.text_encoder.model(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=mask.to(device),
            pixel_values=inputs["pixel_values"].to(device, self.text_encoder.dtype) if "pixel_values" in inputs else None,
            image_grid_thw=inputs["image_grid_thw"].to(device) if "image_grid_thw" in inputs else None,
        ).last_hidden_state
        sequences = []
        for row, row_mask in zip(hidden, mask):
            # Token positions from the CPU mask: no device sync.
            positions = row_mask.nonzero().squeeze(1)[self.template_prefix_tokens :]
            sequences.append(row[positions.to(device)].to(device=self.device, dtype=self.dtype))
        return sequences

    def prompt_kwargs(
        self, positive: list[torch.Tensor], negative: list[torch.Tensor] | None, outputs_per_prompt: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The transformer's text inputs per CFG branch, both padded to one length so that the branches
        can run as one batch (the padding is masked)."""
        length = max(len(s) for s in positive + (negative or []))
        pos = pad_prompt_embeds(positive, length, outputs_per_prompt)
        if negative is None:
            return pos.transformer_kwargs(), None
        neg = pad_prompt_embeds(negative, length, outputs_per_prompt)
        if (pos.mask is None) != (neg.mask is None):  # one branch is padded: both need a mask
            pos, neg = (
                PromptEmbeds(e.embeds, torch.ones(e.embeds.shape[:2], dtype=torch.bool, device=e.embeds.device))
                if e.mask is None
                else e
                for e in (pos, neg)
            )
        return pos.transformer_kwargs(), neg.transformer_kwargs()

    # -- latents ------------------------------------------------------------------------------------

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of packed tokens of an image of height x width pixels."""
        return height // self.size_multiple, width // self.size_multiple

    def prepare_latents(self, seeds: list[int], outputs_per_prompt: int, height: int, width: int) -> torch.Tensor:
        rows, cols = self.latent_grid(height, width)
        channels = self.transformer.config.in_channels // 4
        noise = seeded_noise(seeds, outputs_per_prompt, (channels, 2 * rows, 2 * cols), self.device, self.dtype)
        return pack_latents(noise)

    def prepare_timesteps(self, num_inference_steps: int, image_seq_len: int) -> torch.Tensor:
        mu = shift_from_scheduler_config(self.scheduler, image_seq_len)
        return set_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=default_sigmas(num_inference_steps),
                             mu=mu)

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        rows, cols = self.latent_grid(height, width)
        latents = unpack_latents(latents, 2 * rows, 2 * cols)[:, :, None].to(self.vae.dtype)  # one frame
        mean, std = vae_latent_statistics(self.vae, latents.device)
        # Divided by the reciprocal of std, as the reference does (not bit-equal to multiplying by std).
        latents = latents / (1.0 / std.to(latents.dtype)) + mean.to(latents.dtype)
        return denormalize_images(self.vae.decode(latents, return_dict=False)[0][:, :, 0])

    # -- denoising ----------------------------------------------------------------------------------

    def predict_noise(self, **kwargs: Any) -> torch.Tensor:
        # The transformer predicts every image token; only the first image's (the one being denoised,
        # before any reference images) are the prediction.
        frames, rows, cols = kwargs["img_shapes"][0][0]
        return self.transformer(**kwargs)[:, : frames * rows * cols]

    def combine_cfg_noise(self, positive: torch.Tensor, negative: torch.Tensor, true_cfg_scale: float) -> torch.Tensor:
        guided = negative + true_cfg_scale * (positive - negative)
        # Qwen-Image keeps each token's prediction at the conditional norm (as its reference pipeline does).
        return guided * (positive.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    # -- editing hooks (text-to-image has no input images) ------------------------------------------

    def prepare_references(self, req: OmniDiffusionRequest):
        """(images for the text encoder per prompt, packed reference latents [N, S_ref, C], their patch
        grids) or (None, None, []) without input images."""
        return None, None, []

    # -- the whole call: begin + denoise (DiffusionPipelineBase.forward) + finish ------------------

    def begin(self, req: OmniDiffusionRequest) -> PipelineRun:
        sp = req.sampling_params
        height, width, k = sp.height, sp.width, sp.num_outputs_per_prompt
        timer = self.stage_timer()
        do_true_cfg = self.cfg_enabled(req)

        with timer.stage("encode"):
            prompt_images, references, reference_shapes = self.prepare_references(req)
            positive = self.encode_prompt(req.prompt_texts, prompt_images, sp.max_sequence_length)
            negative = None
            if do_true_cfg:
                negative = self.encode_prompt(self.negative_prompts(req), prompt_images, sp.max_sequence_length)
            positive, negative = self.prompt_kwargs(positive, negative, k)

        with timer.stage("prepare"):
            latents = self.prepare_latents(req.seeds, k, height, width)
            timesteps = self.prepare_timesteps(sp.num_inference_steps, latents.shape[1])
            img_shapes = [[(1, *self.latent_grid(height, width)), *reference_shapes]] * latents.shape[0]
            positive = {**positive, "img_shapes": img_shapes}
            negative = {**negative, "img_shapes": img_shapes} if do_true_cfg else None

        def step_inputs(state: DenoiseState) -> dict[str, Any]:
            inputs = flow_step_inputs(state)
            if references is not None:  # reference image tokens follow the noisy image's
                inputs["hidden_states"] = torch.cat([state.latents, references], dim=1)
            return inputs

        state = DenoiseState.build(self, latents, timesteps, positive, negative, sp.true_cfg_scale, step_inputs)
        return PipelineRun(req, state, timer, {"num_inference_steps": sp.num_inference_steps})

    def finish(self, run: PipelineRun) -> DiffusionOutput:
        sp, timer, latents = run.req.sampling_params, run.timer, run.state.latents
        if sp.output_type == "latent":
            return DiffusionOutput(output=latents, metrics={**timer.timings, **run.metrics})
        with timer.stage("decode"):
            images = self.decode_latents(latents, sp.height, sp.width)
        return DiffusionOutput(output=images, metrics={**timer.timings, **run.metrics})
