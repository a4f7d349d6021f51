"""Tiny random-weight Qwen-Image checkpoints in the exact diffusers layout.

- `build_tiny_qwen_image`: QwenImagePipeline (text to image).
- `build_tiny_qwen_image_edit`: QwenImageEditPipeline (Qwen-Image-Edit: one input image, seen by the
  text encoder through its vision tower and by the transformer as VAE latents).
- `build_tiny_qwen_image_edit_plus`: QwenImageEditPlusPipeline (Qwen-Image-Edit-2509/2511: several
  input images); `zero_cond_t=True` (the default) gives 2511's transformer, which modulates the
  reference-image tokens with the timestep-0 embedding.
- `build_tiny_transformer`: the transformer alone, also in Qwen-Image-Layered's variant.

The text encoder is a tiny Qwen2.5-VL (its vision tower is only used by the edit pipelines); the
tokenizer is a byte-level BPE with no merges (one token per UTF-8 byte) plus the Qwen2-VL special
tokens the prompt templates use. The edit checkpoints' VAE compresses 16x instead of 8x (see `_vae`).

torchvision is not installed beside the CPU torch build, and transformers' `Qwen2VLProcessor` then
cannot be built, saved or loaded: its `__init__` lists a video processor, which needs torchvision.
The processor is built and saved through the image-and-text subclass of
diffserve.models.qwen_image.processor, then the folder is named and completed as a released one
(`complete_processor_folder`). Load it with that module's `load_qwen2vl_processor` (which works
with or without torchvision, also on released checkpoints), and hand it to diffusers' pipeline:
`QwenImageEditPipeline.from_pretrained(path, processor=load_qwen2vl_processor(f"{path}/processor"))`.
"""

from __future__ import annotations

import json
import os

import torch

from diffserve.models.qwen_image.processor import qwen2vl_image_text_processor_class
from diffserve.testing.components import perturb_

HEADS, HEAD_DIM = 2, 16
QK_NORM_SCALE = 3.0
AXES_DIMS_ROPE = (4, 6, 6)  # (frame, row, column) widths; they sum to HEAD_DIM
TEXT_DIM = 32  # the text encoder's hidden size = the transformer's joint_attention_dim
VAE_CHANNELS = 16  # the released VAE's z_dim; its latents_mean/std below are the released ones
VISION_PATCH, VISION_MERGE, VISION_TEMPORAL_PATCH = 14, 2, 2  # Qwen2.5-VL's, used by the image processor
# Images reach the vision tower at no more than 112 x 112 pixels (8 x 8 patches, 16 tokens): the
# released processor allows up to 12.8M pixels.
VISION_MIN_PIXELS, VISION_MAX_PIXELS = 56 * 56, 112 * 112

# Qwen2-VL's special tokens, in the released tokenizer's order (ids 151643...).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The released Qwen-Image scheduler: exponential time shift from the image size, stretched to end at 0.02.
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)

# The released VAE's per-channel latent statistics.
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]


def build_qwen2_tokenizer():
    """A Qwen2 byte-level BPE tokenizer without merges: every UTF-8 byte is one token, so any prompt
    tokenizes; the special tokens follow the 256 byte tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in QWEN2_VL_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]))
    tokenizer.model_max_length = 32768
    return tokenizer


def build_qwen2vl_processor(tokenizer, min_pixels: int = VISION_MIN_PIXELS, max_pixels: int = VISION_MAX_PIXELS):
    """The image-and-text processor; `min_pixels`/`max_pixels` bound the images the vision tower sees
    (the released processor: 56 * 56 and 12845056)."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=VISION_PATCH,
        temporal_patch_size=VISION_TEMPORAL_PATCH,
        merge_size=VISION_MERGE,
    )
    return qwen2vl_image_text_processor_class()(image_processor=image_processor, tokenizer=tokenizer)


def _update_json(path: str, update) -> None:
    with open(path) as f:
        config = json.load(f)
    update(config)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def complete_processor_folder(
    path: str, min_pixels: int = VISION_MIN_PIXELS, max_pixels: int = VISION_MAX_PIXELS
) -> None:
    """The processor was saved by our image-and-text subclass. Name the class transformers ships, as
    released checkpoints do, and add the video processor config `Qwen2VLProcessor` saves beside the
    image processor's (class defaults otherwise), so that where torchvision is installed the folder
    loads with plain `Qwen2VLProcessor.from_pretrained` (not testable here: no torchvision)."""
    video_processor = dict(
        video_processor_type="Qwen2VLVideoProcessor",
        size=dict(shortest_edge=min_pixels, longest_edge=max_pixels),
        patch_size=VISION_PATCH,
        temporal_patch_size=VISION_TEMPORAL_PATCH,
        merge_size=VISION_MERGE,
    )

    def complete(config):
        config.update(processor_class="Qwen2VLProcessor", video_processor=video_processor)

    _update_json(os.path.join(path, "processor", "processor_config.json"), complete)
    _update_json(
        os.path.join(path, "processor", "tokenizer_config.json"), lambda c: c.update(processor_class="Qwen2VLProcessor")
    )
    _update_json(
        os.path.join(path, "model_index.json"), lambda c: c.update(processor=["transformers", "Qwen2VLProcessor"])
    )


def build_qwen25vl_text_encoder(tokenizer, text: dict | None = None, vision: dict | None = None):
    """A Qwen2.5-VL for `tokenizer` (its vocabulary and special-token ids), tiny unless `text` and
    `vision` override entries of its text and vision configs."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            # head_dim 8: the rotary half-width 4 split over (time, height, width) like the released [16, 24, 24].
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 1, 1]),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ) | (text or {}),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=24,
            num_heads=2,
            out_hidden_size=TEXT_DIM,
            patch_size=VISION_PATCH,
            spatial_merge_size=VISION_MERGE,
            temporal_patch_size=VISION_TEMPORAL_PATCH,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ) | (vision or {}),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _vae(seed: int, for_editing: bool):
    from diffusers import AutoencoderKLQwenImage

    if for_editing:
        # The edit pipelines encode every input image at about 1024 x 1024 pixels, whatever its size.
        # With one more 2x downsampling (16x, where the released VAE has 8x) and no residual blocks on
        # the encoder's way down, a tiny VAE encodes that in about 0.5 s (one CPU thread); the
        # pipelines take their sizes from the VAE config, as diffusers' do. 8 channels, perturbed by
        # 0.05: with 4 channels and 0.1 the decoder amplified a latent difference up to 300-fold
        # (measured), turning float32 rounding into 2e-4 pixel differences; this one amplifies it
        # 5- to 15-fold and its output still depends strongly on the latents.
        temporal_downsample, num_res_blocks, base_dim, perturbation = [False, True, True, False], 0, 8, 0.05
    else:
        # The released 8x compression.
        temporal_downsample, num_res_blocks, base_dim, perturbation = [False, True, True], 1, 4, 0.1
    vae = AutoencoderKLQwenImage(
        base_dim=base_dim,
        z_dim=VAE_CHANNELS,
        dim_mult=[1] * (len(temporal_downsample) + 1),
        num_res_blocks=num_res_blocks,
        temperal_downsample=temporal_downsample,
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )
    # Freshly initialised, the tiny decoder barely depends on its input; perturbed, latent
    # differences reach the pixels.
    perturb_(vae, perturbation, torch.Generator().manual_seed(seed + 2))
    return vae.eval()


def build_tiny_transformer(seed: int, zero_cond_t: bool = False, layered: bool = False):
    """diffusers' QwenImageTransformer2DModel, tiny and perturbed; `layered` gives Qwen-Image-Layered's
    extra timestep condition and layer RoPE."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * VAE_CHANNELS,  # 2x2 patches of latents
        out_channels=VAE_CHANNELS,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=AXES_DIMS_ROPE,
        zero_cond_t=zero_cond_t,
        use_additional_t_cond=layered,
        use_layer3d_rope=layered,
    )
    perturb_(transformer, 0.05, torch.Generator().manual_seed(seed + 1))
    # q/k are RMS-normalised, so at unit norm weights the tiny heads' attention is nearly uniform over
    # the (often more than a thousand) keys and the text and reference tokens barely steer the image.
    # Larger q/k scales sharpen it: an error in what the pipelines feed the transformer shows.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                param.mul_(QK_NORM_SCALE)
    return transformer.eval()


def _components(seed: int, for_editing: bool, zero_cond_t: bool = False) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tokenizer = build_qwen2_tokenizer()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=_vae(seed, for_editing),
        text_encoder=build_qwen25vl_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=build_tiny_transformer(seed + 10, zero_cond_t),
    )


def build_tiny_qwen_image(path: str, seed: int = 0) -> str:
    from diffusers import QwenImagePipeline

    QwenImagePipeline(**_components(seed, for_editing=False)).save_pretrained(path, safe_serialization=True)
    return path


def _save_edit_pipeline(pipeline_class, path: str, seed: int, zero_cond_t: bool = False) -> str:
    components = _components(seed, for_editing=True, zero_cond_t=zero_cond_t)
    processor = build_qwen2vl_processor(components["tokenizer"])
    pipeline_class(processor=processor, **components).save_pretrained(path, safe_serialization=True)
    complete_processor_folder(path)
    return path


def build_tiny_qwen_image_edit(path: str, seed: int = 0) -> str:
    from diffusers import QwenImageEditPipeline

    return _save_edit_pipeline(QwenImageEditPipeline, path, seed)


def build_tiny_qwen_image_edit_plus(path: str, seed: int = 0, zero_cond_t: bool = True) -> str:
    from diffusers import QwenImageEditPlusPipeline

    return _save_edit_pipeline(QwenImageEditPlusPipeline, path, seed, zero_cond_t)
