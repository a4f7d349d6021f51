"""Tiled VAE decoding, with the tiles spread over ranks (VAE patch parallelism).

A large latent is decoded as overlapping spatial tiles: each tile alone, then neighbours are blended
linearly across their overlap and every tile keeps its stride's worth of pixels. Tiling bounds the
decoder's memory; spreading the tiles over a group of P ranks (tile k on rank k mod P) also divides
its time by up to P. Every rank then receives all tiles (one all-gather) and stitches the same image,
so the result does not depend on P: it is the single-process tiled decode.

The tile geometry, the per-tile decode and the blend are the VAE's own (diffusers' `tiled_decode` for
AutoencoderKL, AutoencoderKLWan and AutoencoderKLQwenImage), so outputs equal
`vae.enable_tiling(); vae.decode(z)`. The
engine swaps each pipeline VAE's `decode` for the tiled one (`apply_vae_tiling`); pipelines still call
`vae.decode` and change nothing. Latents no larger than one tile decode untiled, as in diffusers.

Slicing (`apply_vae_slicing`) is the other memory saver: a batch is encoded and decoded one sample at a
time, so the VAE's activations stop growing with the batch. It wraps whatever `encode`/`decode` is
installed, so with tiling each sample is decoded in tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from diffserve.distributed.parallel_state import GroupCoordinator, get_vae_group
from diffserve.models.interface import discover_components

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileLayout:
    """One VAE family's tiling, in latent pixels (tile, stride) and decoder-output pixels (the rest)."""

    decode_tile: Callable[[torch.Tensor], torch.Tensor]  # latent tile -> decoded tile, unfinished
    finish: Callable[[torch.Tensor], torch.Tensor]  # stitched output -> the VAE's final output
    latent_tile: tuple[int, int]
    latent_stride: tuple[int, int]
    scale: int  # decoder-output pixels per latent pixel
    blend: tuple[int, int]
    keep: tuple[int, int]  # decoder-output pixels each tile contributes (its stride)


# -- the VAE families --------------------------------------------------------------------------------


def _autoencoder_kl_layout(vae) -> TileLayout:
    tile, overlap = vae.tile_latent_min_size, vae.tile_overlap_factor
    stride = int(tile * (1 - overlap))
    blend = int(vae.tile_sample_min_size * overlap)
    keep = vae.tile_sample_min_size - blend

    def decode_tile(z):
        if vae.config.use_post_quant_conv:
            z = vae.post_quant_conv(z)
        return vae.decoder(z)

    return TileLayout(decode_tile, lambda x: x, (tile, tile), (stride, stride),
                      vae.tile_sample_min_size // tile, (blend, blend), (keep, keep))


def _frame_by_frame_decode(vae, first_chunk: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A causal video VAE's decode of one latent tile: frame by frame with its feature cache, as its
    untiled decode does, but without the final clamp (tiles are blended first). `first_chunk`: the
    decoder takes that flag (Wan's), Qwen-Image's does not."""

    def decode_tile(z):
        vae.clear_cache()
        frames = []
        for k in range(z.shape[2]):
            vae._conv_idx = [0]
            x = vae.post_quant_conv(z[:, :, k : k + 1])
            flag = {"first_chunk": k == 0} if first_chunk else {}
            frames.append(vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **flag))
        vae.clear_cache()
        return torch.cat(frames, dim=2)

    return decode_tile


def _video_vae_layout(vae, decode_tile, finish, patch: int) -> TileLayout:
    """The tiling of the Wan-style VAEs, set in decoder-output pixels by their tile_sample_* attributes;
    `patch`: the decoder's output is patchified by this factor (unpatchified in `finish`)."""
    ratio = vae.spatial_compression_ratio
    tile_h, tile_w = vae.tile_sample_min_height, vae.tile_sample_min_width
    stride_h, stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    return TileLayout(
        decode_tile,
        finish,
        (tile_h // ratio, tile_w // ratio),
        (stride_h // ratio, stride_w // ratio),
        ratio // patch,
        ((tile_h - stride_h) // patch, (tile_w - stride_w) // patch),
        (stride_h // patch, stride_w // patch),
    )


def _autoencoder_kl_wan_layout(vae) -> TileLayout:
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    def finish(x):
        if vae.config.patch_size is not None:  # Wan2.2's VAE decodes to 2x2-patchified pixels
            x = unpatchify(x, patch_size=vae.config.patch_size)
        return x.clamp(-1.0, 1.0)

    return _video_vae_layout(vae, _frame_by_frame_decode(vae, first_chunk=True), finish, vae.config.patch_size or 1)


def _autoencoder_kl_qwen_image_layout(vae) -> TileLayout:
    # diffusers' tiled decode of this VAE does not clamp (its untiled one does); the pipelines clamp
    # their images anyway.
    return _video_vae_layout(vae, _frame_by_frame_decode(vae, first_chunk=False), lambda x: x, 1)


# diffusers VAE class name -> its tile layout.
TILE_LAYOUTS: dict[str, Callable[[nn.Module], TileLayout]] = {
    "AutoencoderKL": _autoencoder_kl_layout,
    "AutoencoderKLWan": _autoencoder_kl_wan_layout,
    "AutoencoderKLQwenImage": _autoencoder_kl_qwen_image_layout,
}


# -- decoding ----------------------------------------------------------------------------------------


def _blend(above_or_left: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first `extent` rows (dim -2) or columns (dim -1) of `tile` from its neighbour, in place."""
    extent = min(above_or_left.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return
    ramp = torch.arange(extent, device=tile.device, dtype=torch.float32) / extent
    ramp = ramp.to(tile.dtype).view(-1, 1) if dim == -2 else ramp.to(tile.dtype)
    head = tile.narrow(dim, 0, extent)
    head.copy_(above_or_left.narrow(dim, above_or_left.shape[dim] - extent, extent) * (1 - ramp) + head * ramp)


def _gather_tiles(
    local: list[torch.Tensor], count: int, group: GroupCoordinator, like: torch.Tensor
) -> list[torch.Tensor]:
    """Every rank's decoded tiles, in tile order (tile k was decoded by group rank k mod P).

    Edge tiles are smaller, so each rank pads its tiles to the largest shape for one all-gather.
    """
    p = group.world_size
    if p == 1:
        return local
    shapes: list = [None] * p
    dist.all_gather_object(shapes, [tuple(t.shape) for t in local], group=group.group)
    every = [shape for rank in shapes for shape in rank]
    padded = [max(shape[d] for shape in every) for d in range(len(every[0]))]
    send = torch.zeros([-(-count // p)] + padded, dtype=like.dtype, device=like.device)
    for i, t in enumerate(local):
        send[(i,) + tuple(slice(0, n) for n in t.shape)] = t
    received = torch.empty([p * send.shape[0]] + padded, dtype=send.dtype, device=send.device)
    dist.all_gather_into_tensor(received, send, group=group.group)
    received = received.view([p] + list(send.shape))
    return [
        received[(k % p, k // p) + tuple(slice(0, n) for n in shapes[k % p][k // p])] for k in range(count)
    ]


def tiled_decode(z: torch.Tensor, layout: TileLayout, group: GroupCoordinator) -> torch.Tensor:
    """Decode `z` ([B, C, H, W] or [B, C, T, H, W]) tile by tile, this rank's share of the tiles only."""
    height, width = z.shape[-2:]
    (tile_h, tile_w), (stride_h, stride_w) = layout.latent_tile, layout.latent_stride
    origins = [(i, j) for i in range(0, height, stride_h) for j in range(0, width, stride_w)]
    mine = [
        layout.decode_tile(z[..., i : i + tile_h, j : j + tile_w])
        for k, (i, j) in enumerate(origins)
        if k % group.world_size == group.rank_in_group
    ]
    tiles = _gather_tiles(mine, len(origins), group, like=z)
    cols = len(range(0, width, stride_w))
    grid = [tiles[r * cols : (r + 1) * cols] for r in range(len(tiles) // cols)]
    (blend_h, blend_w), (keep_h, keep_w) = layout.blend, layout.keep
    rows = []
    for r, row in enumerate(grid):
        for c, tile in enumerate(row):  # in place, in order: each tile blends its finished neighbours
            if r > 0:
                _blend(grid[r - 1][c], tile, blend_h, dim=-2)
            if c > 0:
                _blend(row[c - 1], tile, blend_w, dim=-1)
        rows.append(torch.cat([tile[..., :keep_h, :keep_w] for tile in row], dim=-1))
    out = torch.cat(rows, dim=-2)[..., : height * layout.scale, : width * layout.scale]
    return layout.finish(out)


# -- wiring ------------------------------------------------------------------------------------------


def _tiled_decode_method(vae: nn.Module, layout: TileLayout, group: GroupCoordinator):
    untiled_decode = vae.decode
    tile_h, tile_w = layout.latent_tile

    def decode(z: torch.Tensor, return_dict: bool = True):
        if z.shape[-2] <= tile_h and z.shape[-1] <= tile_w:
            return untiled_decode(z, return_dict=return_dict)
        from diffusers.models.autoencoders.vae import DecoderOutput

        sample = tiled_decode(z, layout, group)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    return decode


def apply_vae_tiling(pipeline: nn.Module) -> int:
    """Make every VAE of the pipeline decode in tiles, spread over the VAE patch-parallel group.

    Returns how many VAEs were switched. A VAE of a family without a tile layout is an error.
    """
    group = get_vae_group()
    vaes = discover_components(pipeline)["vae"]
    if not vaes:
        raise ValueError(
            f"{type(pipeline).__name__} has no VAE (it declares _vae_modules={getattr(pipeline, '_vae_modules', None)}), "
            f"so VAE tiling / patch parallelism does not apply; leave vae_use_tiling off and "
            f"vae_patch_parallel_size at 1"
        )
    for path, vae in vaes.items():
        family = type(vae).__name__
        if family not in TILE_LAYOUTS:
            raise ValueError(
                f"{path}: VAE class {family} has no tiled decode in diffserve; supported: {', '.join(TILE_LAYOUTS)}"
            )
        vae.decode = _tiled_decode_method(vae, TILE_LAYOUTS[family](vae), group)
        logger.info("%s (%s): tiled decode over %d rank(s)", path, family, group.world_size)
    return len(vaes)


# -- slicing -----------------------------------------------------------------------------------------


def _sliced_decode(decode):
    def sliced(z: torch.Tensor, return_dict: bool = True, **kwargs):
        if z.shape[0] <= 1:
            return decode(z, return_dict=return_dict, **kwargs)
        outputs = [decode(z[i : i + 1], return_dict=True, **kwargs) for i in range(z.shape[0])]
        sample = torch.cat([out.sample for out in outputs])
        return type(outputs[0])(sample=sample) if return_dict else (sample,)

    return sliced


def _sliced_encode(encode):
    def sliced(x: torch.Tensor, return_dict: bool = True, **kwargs):
        if x.shape[0] <= 1:
            return encode(x, return_dict=return_dict, **kwargs)
        outputs = [encode(x[i : i + 1], return_dict=True, **kwargs) for i in range(x.shape[0])]
        # The posterior is rebuilt from the samples' concatenated moments, as an unsliced encode makes it.
        first = outputs[0].latent_dist
        moments = torch.cat([out.latent_dist.parameters for out in outputs])
        dist = type(first)(moments, deterministic=first.deterministic)
        return type(outputs[0])(latent_dist=dist) if return_dict else (dist,)

    return sliced


def apply_vae_slicing(pipeline: nn.Module) -> int:
    """Make every VAE of the pipeline encode and decode a batch one sample at a time; returns how many."""
    vaes = discover_components(pipeline)["vae"]
    if not vaes:
        raise ValueError(
            f"{type(pipeline).__name__} has no VAE (it declares "
            f"_vae_modules={getattr(pipeline, '_vae_modules', None)}), so vae_use_slicing does not apply; leave it off"
        )
    for path, vae in vaes.items():
        if not callable(getattr(vae, "decode", None)):
            raise ValueError(f"{path} ({type(vae).__name__}) has no decode method to slice")
        vae.decode = _sliced_decode(vae.decode)
        if callable(getattr(vae, "encode", None)):
            vae.encode = _sliced_encode(vae.encode)
        logger.info("%s (%s): sliced encode/decode (one sample at a time)", path, type(vae).__name__)
    return len(vaes)
