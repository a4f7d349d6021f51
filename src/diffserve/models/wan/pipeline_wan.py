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
import torch.nn as nn

from diffserve.config import OmniDiffusionConfig
from diffserve.distributed.cfg_parallel import CFGParallelMixin
from diffserve.loader import AutoWeightsLoader, DiffusersPipelineLoader
from diffserve.models.flow_match import set_timesteps
from diffserve.models.denoise import denoise
from diffserve.models.interface import SupportsComponentDiscovery
from diffserve.models.outputs import denormalize_images, seeded_noise, video_post_process
from diffserve.models.progress_bar import ProgressBarMixin
from diffserve.models.stage_timer import StageTimer
from diffserve.models.wan.wan_transformer import WanTI2VTransformer3DModel, WanTransformer3DModel, WanTransformerConfig
from diffserve.request import DiffusionOutput, OmniDiffusionRequest

logger = logging.getLogger(__name__)

DIT_NAMES = ("transformer", "transformer_2")


def get_wan_post_process_func(od_config: OmniDiffusionConfig):
    return video_post_process


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


class WanPipeline(nn.Module, CFGParallelMixin, ProgressBarMixin, SupportsComponentDiscovery):
    output_modality: ClassVar[str] = "video"
    # Both experts of Wan2.2 are denoisers; a Wan2.1 checkpoint has only the first, and its instance
    # lists only that one (see __init__).
    _dit_modules: ClassVar[list[str]] = list(DIT_NAMES)
    _encoder_modules: ClassVar[list[str]] = ["text_encoder"]
    _vae_modules: ClassVar[list[str]] = ["vae"]
    # Both CFG branches can run as one forward of twice the batch (see CFGParallelMixin).
    cfg_batched_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")

    # diffusers' defaults for these pipelines (Wan2.1 480p).
    default_height, default_width, default_num_frames = 480, 832, 81
    default_steps = 50
    default_guidance_scale = 5.0
    max_sequence_length = 512
    max_video_side = 4096

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        super().__init__()
        import diffusers
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.od_config = od_config
        path, dtype = od_config.model, od_config.torch_dtype
        index = _load_model_index(od_config)
        self.boundary_ratio: float | None = index.get("boundary_ratio")
        self.expand_timesteps = bool(index.get("expand_timesteps", False))

        scheduler_cls = getattr(diffusers, index.get("scheduler", [None, "UniPCMultistepScheduler"])[1])
        self.scheduler = scheduler_cls.from_pretrained(path, subfolder="scheduler")
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
        self.weights_sources = []
        for name in self._dit_modules:
            config = WanTransformerConfig.from_pretrained(f"{path}/{name}")
            with torch.device("meta"):  # weights come from weights_sources
                setattr(self, name, transformer_cls(config, od_config=od_config).to(dtype))
            self.weights_sources.append(
                DiffusersPipelineLoader.ComponentSource(
                    model_or_path=path, subfolder=name, prefix=f"{name}.", fall_back_to_pt=True
                )
            )
        self.set_progress_bar_config(disable=od_config.disable_progress_bar)

    @property
    def is_dual(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def default_fps(self) -> int:
        # TI2V-5B was trained at 24 fps, the A14B and Wan2.1 models at 16.
        return 24 if self.expand_timesteps else 16

    # -- defaults and checks ------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        # The VAE downsamples by vae_scale_factor_spatial and the transformer patchifies the rest.
        return self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]

    def resolve_params(self, req: OmniDiffusionRequest) -> dict[str, Any]:
        sp = req.sampling_params
        guidance = self.default_guidance_scale if sp.guidance_scale is None else sp.guidance_scale
        return dict(
            height=sp.height or self.default_height,
            width=sp.width or self.default_width,
            num_frames=sp.num_frames or self.default_num_frames,
            steps=sp.num_inference_steps or self.default_steps,
            guidance_scale=guidance,
            # Wan2.2's low-noise expert uses the same scale unless told otherwise.
            guidance_scale_2=guidance if sp.guidance_scale_2 is None else sp.guidance_scale_2,
            max_sequence_length=sp.max_sequence_length or self.max_sequence_length,
            fps=sp.fps or self.default_fps,
        )

    def check_inputs(self, req: OmniDiffusionRequest, p: dict[str, Any]) -> None:
        if not req.prompts:
            raise ValueError("a request needs at least one prompt")
        t = self.vae_scale_factor_temporal
        if (p["num_frames"] - 1) % t:
            raise ValueError(
                f"num_frames={p['num_frames']} is not supported: it must be {t}k+1 (e.g. {t + 1}, 33, 81), "
                f"because the VAE compresses {t} frames into one latent frame after the first"
            )
        m = self.size_multiple
        for name in ("height", "width"):
            value = p[name]
            if value % m or not m <= value <= self.max_video_side:
                raise ValueError(
                    f"{name}={value} is not supported: it must be a multiple of {m} between {m} and "
                    f"{self.max_video_side}"
                )
        if p["max_sequence_length"] > self.max_sequence_length:
            raise ValueError(
                f"max_sequence_length={p['max_sequence_length']} exceeds the UMT5 limit {self.max_sequence_length}"
            )
        sp = req.sampling_params
        if sp.guidance_scale_2 is not None and not self.is_dual:
            raise ValueError(
                "guidance_scale_2 is only used by two-expert (Wan2.2 A14B) checkpoints; this one has a single "
                "transformer"
            )
        if sp.true_cfg_scale != 1.0:
            raise ValueError(
                f"true_cfg_scale={sp.true_cfg_scale} is not used by Wan; classifier-free guidance is set by "
                "guidance_scale (> 1 turns it on, with the negative prompt or '')"
            )
        self.check_images(req)

    def check_images(self, req: OmniDiffusionRequest) -> None:
        if any(p.images for p in req.prompts):
            raise ValueError(
                f"{type(self).__name__} is text-to-video and takes no images; use an image-to-video checkpoint "
                "(WanImageToVideoPipeline)"
            )

    # -- stages -------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], outputs_per_prompt: int, max_sequence_length: int) -> torch.Tensor:
        """UMT5 embeddings [B*k, L, D]; positions past each prompt's end are zero."""
        prompts = [clean_prompt(p) for p in prompts]
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        lengths = [len(x) for x in self.tokenizer(prompts, truncation=False).input_ids]
        if max(lengths) > max_sequence_length:
            logger.warning("prompt truncated to %d tokens (it had %d)", max_sequence_length, max(lengths))
        device = self.text_encoder.device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        embeds = self.text_encoder(ids, mask).last_hidden_state.to(device=self.device, dtype=self.dtype)
        # The model was trained with zeros after the prompt, not the encoder's padding outputs.
        embeds = embeds * mask.to(device=self.device, dtype=embeds.dtype)[..., None]
        return embeds.repeat_interleave(outputs_per_prompt, dim=0)

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
        # `dit` names the expert of this step (Wan2.2); both CFG branches carry the same one.
        return getattr(self, dit)(**kwargs)

    def latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) of the VAE latents, [1, C, 1, 1, 1], computed as the reference does (it divides
        by the reciprocal, which is not bit-equal to multiplying by std)."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(self.device, torch.float32)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(self.device, torch.float32)
        return mean, inv_std

    def finalize_latents(self, latents: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float videos [N, 3, F, H, W] in [0, 1]."""
        mean, inv_std = self.latent_statistics()
        latents = latents.to(self.vae.dtype) / inv_std.to(self.vae.dtype) + mean.to(self.vae.dtype)
        return denormalize_images(self.vae.decode(latents, return_dict=False)[0])

    def prepare_conditioning(self, req: OmniDiffusionRequest, p: dict[str, Any], shape: tuple[int, ...]):
        """(extra transformer kwargs shared by both CFG branches, state for transformer_inputs)."""
        return {}, {}

    # -- the whole call -----------------------------------------------------------------------------

    def forward(self, req: OmniDiffusionRequest) -> DiffusionOutput:
        p = self.resolve_params(req)
        self.check_inputs(req, p)
        k = req.sampling_params.num_outputs_per_prompt
        timer = StageTimer(self.device)
        # Classifier-free guidance follows the first expert's scale, as in the reference.
        do_cfg = p["guidance_scale"] > 1.0

        with timer.stage("encode"):
            embeds = self.encode_prompt(req.prompt_texts, k, p["max_sequence_length"])
            if do_cfg:
                negatives = [n or "" for n in req.negative_prompt_texts]
                neg_embeds = self.encode_prompt(negatives, k, p["max_sequence_length"])
            shape = self.latent_shape(p["num_frames"], p["height"], p["width"])
            shared_kwargs, cond = self.prepare_conditioning(req, p, shape)

        with timer.stage("denoise"):
            latents = self.prepare_latents(req.seeds, k, shape)
            timesteps = self.prepare_timesteps(p["steps"])
            experts = self.expert_schedule(timesteps, p["guidance_scale"], p["guidance_scale_2"])
            positive = {**shared_kwargs, "encoder_hidden_states": embeds}
            negative = {**shared_kwargs, "encoder_hidden_states": neg_embeds} if do_cfg else None
            latents = denoise(
                self, latents, timesteps, positive, negative, [scale for _, scale in experts],
                step_inputs=lambda latents, t, i: {"dit": experts[i][0], **self.transformer_inputs(latents, t, cond)},
            )
            latents = self.finalize_latents(latents, cond)

        metrics = {"num_inference_steps": p["steps"], "num_frames": p["num_frames"], "fps": p["fps"]}
        if req.sampling_params.output_type == "latent":
            return DiffusionOutput(output=latents, metrics={**timer.timings, **metrics})
        with timer.stage("decode"):
            videos = self.decode_latents(latents)
        return DiffusionOutput(output=videos, metrics={**timer.timings, **metrics})

    def load_weights(self, weights) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)
