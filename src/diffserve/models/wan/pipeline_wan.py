"""Wan text-to-video: Wan2.1 (T2V-1.3B/14B), Wan2.2 T2V-A14B (two experts: `transformer` for high
noise, `transformer_2` for low noise, switched at `boundary_ratio`) and Wan2.2 TI2V-5B
(`expand_timesteps`: one timestep per patch token).

The image-to-video pipeline (pipeline_wan_i2v.py) extends this one: it only adds image inputs and a
conditioning tensor to what the transformer sees.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any, ClassVar

import torch

from diffserve.config import OmniDiffusionConfig
from diffserve.models.base import DiffusionPipelineBase, PipelineRun, repeat_per_output
from diffserve.models.denoise import DenoiseState
from diffserve.models.flow_match import set_timesteps
from diffserve.models.unipc import host_stepping
from diffserve.models.outputs import denormalize_images, seeded_noise, vae_latent_statistics
from diffserve.models.spec import SamplingSpec
from diffserve.models.wan.wan_transformer import WanTI2VTransformer3DModel, WanTransformer3DModel, WanTransformerConfig
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)

DIT_NAMES = ("transformer", "transformer_2")


def clean_prompt(text: str) -> str:
    """Repair mojibake, undo (double) HTML escaping and collapse whitespace, as Wan was trained with."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def _component_present(index: dict[str, Any], name: str) -> bool:
    spec = index.get(name)
    return isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[1] is not None


def _load_model_index(od_config: OmniDiffusionConfig) -> dict[str, Any]:
    if od_config.model_config:
        return od_config.model_config
    from diffserve.registry import read_model_index

    return read_model_index(od_config.model)


class WanPipeline(DiffusionPipelineBase):
    # Both experts of Wan2.2 are denoisers; a Wan2.1 checkpoint has only the first, and its instance
    # lists only that one (see __init__).
    _dit_modules: ClassVar[list[str]] = list(DIT_NAMES)
    _encoder_modules: ClassVar[list[str]] = ["text_encoder"]
    _vae_modules: ClassVar[list[str]] = ["vae"]
    # Both CFG branches can run as one forward of twice the batch (see CFGParallelMixin).
    cfg_batched_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")
    supports_step_batching: ClassVar[bool] = True

    max_sequence_length = 512

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        import diffusers
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        path, dtype = od_config.model, od_config.torch_dtype
        index = _load_model_index(od_config)
        self.boundary_ratio: float | None = index.get("boundary_ratio")
        self.expand_timesteps = bool(index.get("expand_timesteps", False))

        scheduler_cls = getattr(diffusers, index.get("scheduler", [None, "UniPCMultistepScheduler"])[1])
        # Wan's UniPC steps with host-side coefficients: diffusers' syncs with the GPU every step.
        self.scheduler = host_stepping(scheduler_cls.from_pretrained(path, subfolder="scheduler"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        # The Wan VAE runs in float32, as in the reference examples: bf16 decoding visibly bands.
        self.vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial

        self._dit_modules = [name for name in DIT_NAMES if _component_present(index, name)]
        if "transformer" not in self._dit_modules:
            raise ValueError(f"{path} has no 'transformer'; diffserve needs it (transformer_2 alone is not supported)")
        if (self.boundary_ratio is None) != ("transformer_2" not in self._dit_modules):
            raise ValueError(
                f"{path}: boundary_ratio ({self.boundary_ratio}) and transformer_2 must be given together "
                "(Wan2.2's two experts switch at the boundary)"
            )
        transformer_cls = WanTI2VTransformer3DModel if self.expand_timesteps else WanTransformer3DModel
        for name in self._dit_modules:
            self.add_checkpoint_module(name, transformer_cls, WanTransformerConfig.from_pretrained(f"{path}/{name}"))

    @property
    def is_dual(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def default_fps(self) -> int:
        # TI2V-5B was trained at 24 fps, the A14B and Wan2.1 models at 16.
        return 24 if self.expand_timesteps else 16

    def sampling_spec(self) -> SamplingSpec:
        params = {"height", "width", "num_frames", "fps", "num_inference_steps", "guidance_scale",
                  "max_sequence_length"}
        if self.is_dual:
            params.add("guidance_scale_2")  # unset: the low-noise expert uses guidance_scale too
        return SamplingSpec(
            modality="video",
            params=frozenset(params),
            # diffusers' defaults for these pipelines (Wan2.1 480p).
            defaults={"height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 50,
                      "guidance_scale": 5.0, "max_sequence_length": self.max_sequence_length, "fps": self.default_fps},
            cfg="guidance",
            # The VAE downsamples by vae_scale_factor_spatial and the transformer patchifies the rest.
            size_multiple=self.vae_scale_factor_spatial * self.transformer.config.patch_size[1],
            frames_multiple=self.vae_scale_factor_temporal,
            max_sequence_length=self.max_sequence_length,
        )

    # -- stages -------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], outputs_per_prompt: int, max_sequence_length: int) -> torch.Tensor:
        """UMT5 embeddings [B*k, L, D]; positions past each prompt's end are zero."""
        prompts = [clean_prompt(p) for p in prompts]
        tokens = self.tokenize(self.tokenizer, prompts, max_sequence_length, return_attention_mask=True)
        # The execution device: under CPU offload the encoder's weights may still be on the host.
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(ids, mask).last_hidden_state.to(device=self.device, dtype=self.dtype)
        # The model was trained with zeros after the prompt, not the encoder's padding outputs.
        embeds = embeds * mask.to(device=self.device, dtype=embeds.dtype)[..., None]
        return repeat_per_output(embeds, outputs_per_prompt)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of the noise."""
        s = self.vae_scale_factor_spatial
        frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        return self.vae.config.z_dim, frames, height // s, width // s

    def prepare_latents(self, seeds: list[int], outputs_per_prompt: int, shape: tuple[int, ...]) -> torch.Tensor:
        # Latents stay float32 throughout the loop, as in the reference; the transformer gets a cast copy.
        return seeded_noise(seeds, outputs_per_prompt, shape, self.device, torch.float32)

    def prepare_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return set_timesteps(self.scheduler, num_inference_steps, self.device)

    def expert_schedule(self, timesteps: torch.Tensor, guidance_scale: float, guidance_scale_2: float):
        """[(transformer name, guidance scale)] per step. Wan2.2 runs `transformer` while
        t >= boundary_ratio * num_train_timesteps and `transformer_2` after."""
        if not self.is_dual:
            return [("transformer", guidance_scale)] * len(timesteps)
        boundary = self.boundary_ratio * self.scheduler.config.num_train_timesteps
        # One host read of the schedule, before the loop, so no step has to sync to choose its expert.
        high_noise = (timesteps >= boundary).tolist()
        return [
            ("transformer", guidance_scale) if high else ("transformer_2", guidance_scale_2) for high in high_noise
        ]

    def token_timesteps(self, t: torch.Tensor, batch: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The timestep the transformer gets: [B], or with expand_timesteps one per patch token [B, S]."""
        if not self.expand_timesteps:
            return t.expand(batch)
        _, frames, height, width = latent_shape
        _, p_h, p_w = self.transformer.config.patch_size
        tokens = frames * (height // p_h) * (width // p_w)
        return (torch.ones(tokens, device=self.device) * t).expand(batch, -1)

    def transformer_inputs(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        """The step's hidden_states and timestep; image-to-video adds its conditioning here."""
        return {
            "hidden_states": latents.to(self.dtype),
            "timestep": self.token_timesteps(t, latents.shape[0], tuple(latents.shape[1:])),
        }

    def predict_noise(self, dit: str = "transformer", **kwargs: Any) -> torch.Tensor:
        # `dit` names the expert of this step (Wan2.2); both CFG branches carry the same one, and
        # requests stepped together run one call per expert (a string step input: denoise_step).
        return getattr(self, dit)(**kwargs)

    def latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) of the VAE latents, [1, C, 1, 1, 1], computed as the reference does (it divides
        by the reciprocal, which is not bit-equal to multiplying by std)."""
        mean, std = vae_latent_statistics(self.vae, self.device)
        return mean, 1.0 / std

    def finalize_latents(self, latents: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float videos [N, 3, F, H, W] in [0, 1]."""
        mean, inv_std = self.latent_statistics()
        latents = latents.to(self.vae.dtype) / inv_std.to(self.vae.dtype) + mean.to(self.vae.dtype)
        return denormalize_images(self.vae.decode(latents, return_dict=False)[0])

    def prepare_conditioning(self, req: OmniDiffusionRequest, shape: tuple[int, ...]):
        """(extra transformer kwargs shared by both CFG branches, state for transformer_inputs)."""
        return {}, {}

    # -- the whole call: begin + denoise (DiffusionPipelineBase.forward) + finish ------------------

    def begin(self, req: OmniDiffusionRequest) -> PipelineRun:
        sp = req.sampling_params
        k = sp.num_outputs_per_prompt
        guidance_scale_2 = sp.guidance_scale if sp.guidance_scale_2 is None else sp.guidance_scale_2
        timer = self.stage_timer()
        # Classifier-free guidance follows the first expert's scale, as in the reference.
        do_cfg = self.cfg_enabled(req)

        with timer.stage("encode"):
            embeds = self.encode_prompt(req.prompt_texts, k, sp.max_sequence_length)
            if do_cfg:
                neg_embeds = self.encode_prompt(self.negative_prompts(req), k, sp.max_sequence_length)
            shape = self.latent_shape(sp.num_frames, sp.height, sp.width)
            shared_kwargs, cond = self.prepare_conditioning(req, shape)

        with timer.stage("prepare"):
            latents = self.prepare_latents(req.seeds, k, shape)
            timesteps = self.prepare_timesteps(sp.num_inference_steps)
            experts = self.expert_schedule(timesteps, sp.guidance_scale, guidance_scale_2)
            positive = {**shared_kwargs, "encoder_hidden_states": embeds}
            negative = {**shared_kwargs, "encoder_hidden_states": neg_embeds} if do_cfg else None

        def step_inputs(state: DenoiseState) -> dict[str, Any]:
            return {"dit": experts[state.index][0], **self.transformer_inputs(state.latents, state.timestep, cond)}

        state = DenoiseState.build(self, latents, timesteps, positive, negative, [scale for _, scale in experts],
                                   step_inputs)
        metrics = {"num_inference_steps": sp.num_inference_steps, "num_frames": sp.num_frames, "fps": sp.fps}
        return PipelineRun(req, state, timer, metrics, context={"conditioning": cond})

    def finish(self, run: PipelineRun) -> DiffusionOutput:
        sp, timer = run.req.sampling_params, run.timer
        latents = self.finalize_latents(run.state.latents, run.context["conditioning"])
        if sp.output_type == "latent":
            return DiffusionOutput(output=latents, metrics={**timer.timings, **run.metrics})
        with timer.stage("decode"):
            videos = self.decode_latents(latents)
        return DiffusionOutput(output=videos, metrics={**timer.timings, **run.metrics})
