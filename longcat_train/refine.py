"""The 720p refinement of a finished video, as the official ``generate_refine`` does it.

The video is upsampled to its 720p bucket (bilinearly in space; with ``temporal`` also to twice the
frames, trilinearly), padded in time so that the condition and the noisy latent frames each fill whole
blocks of the block-sparse attention, VAE-encoded and brought back to noise level ``strength``
(``(1 - s) * latents + s * noise``). The start image, fitted to the same bucket and encoded as a block
of condition frames, replaces the first block. Then the plain schedule's steps below ``strength`` run
without guidance, with the model the caller has set up (the refinement LoRA applied) and block-sparse
attention (dense where the kernel cannot run, with a warning), and the padding is cut off the decoded
frames.

Where it differs from upstream, on purpose: the VAE posterior mean is encoded (upstream samples it),
as everywhere in this project, and the pixels are resampled in float32 (upstream: the DiT's dtype).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from longcat_data.buckets import (
    MIN_FRAMES,
    VAE_TEMPORAL_STRIDE,
    aspect_distance,
    choose_bucket,
    cover_scale,
    latent_frames,
    make_buckets,
)
from longcat_data.encode import encode_pixels, pad_text_embeds
from longcat_data.video import center_crop_box
from longcat_train.attention import block_sparse_kernel_missing
from longcat_train.model import transformer_of
from longcat_train.sampling import (
    MAX_UPSCALE,
    SampleInputError,
    StepCallback,
    Visiting,
    decode_videos,
    euler_loop,
    initial_noise,
    refine_scheduler,
)
from longcat_train.video_settings import RefineSettings

log = logging.getLogger(__name__)

# Refined sizes have sides on this grid: 8x the VAE, 2x the patch, 4x4 patches per attention block.
REFINE_GRID = 64
# Latent frames per block of the block-sparse attention in time (the official bsa_params' block depth).
BLOCK_LATENT_FRAMES = 4
# The video is stretched to its bucket (as upstream does), so the bucket's aspect ratio must be near the
# video's; every 480p bucket has a 720p bucket within this factor.
MAX_STRETCH = 1.15


def refine_bucket(h: int, w: int, area: tuple[int, int]) -> tuple[int, int]:
    """The bucket (H, W) an h x w video is refined at: the one of ``area``'s buckets on the 64-pixel grid
    nearest its aspect ratio. SampleInputError (one line) when none fits: too far in aspect ratio, not
    larger than the video, or more than ``MAX_UPSCALE`` times larger."""
    where = f"--refine-area {area[0]}x{area[1]}"
    buckets = [b for b in make_buckets(area, REFINE_GRID) if b[0] % REFINE_GRID == b[1] % REFINE_GRID == 0]
    if not buckets:
        raise SampleInputError(
            f"{where} holds no size with sides on the {REFINE_GRID}-pixel grid; give at least "
            f"{REFINE_GRID}x{REFINE_GRID}"
        )
    bucket = choose_bucket(h, w, buckets, allow_upscale=True)
    size = f"the {w}x{h} (WxH) video"
    target = f"{bucket[1]}x{bucket[0]}"
    stretch = math.exp(aspect_distance(h, w, bucket))
    if stretch > MAX_STRETCH:
        raise SampleInputError(
            f"--refine: {size} has no bucket of {where} near its aspect ratio (the nearest, {target}, "
            f"would stretch it {stretch - 1:.0%}); start from an image (or an --area) of a less extreme shape"
        )
    if bucket[0] * bucket[1] <= h * w:
        raise SampleInputError(
            f"--refine: {size} is already as large as its bucket {target} of {where}; refine a smaller "
            f"video (--area) or give a larger --refine-area"
        )
    scale = cover_scale(h, w, bucket)
    if scale > MAX_UPSCALE:
        raise SampleInputError(
            f"--refine: {size} is too small for {where}: its bucket {target} is {scale:.1f}x larger (at "
            f"most {MAX_UPSCALE:g}x: the refinement adds detail, not size); sample it at a larger --area "
            f"or give a smaller --refine-area"
        )
    return bucket


@dataclass(frozen=True)
class RefineLayout:
    """The refined video in time: ``frames`` frames, after ``front`` copies of its first frame (which
    become the ``cond_latents`` condition latent frames) and before ``back`` copies of its last one (so
    the noisy latent frames fill whole attention blocks)."""

    frames: int
    front: int
    back: int
    cond_latents: int

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.front + self.frames + self.back)


def refine_layout(frames: int, *, temporal: bool) -> RefineLayout:
    """The layout of a refined ``frames``-frame video (``temporal``: it gets twice the frames)."""
    if frames < MIN_FRAMES:
        raise SampleInputError(f"a refined video needs at least {MIN_FRAMES} frames, got {frames}")
    out = 2 * frames if temporal else frames
    # One start frame is one latent frame; its block is filled with copies of it in front.
    cond_latents = BLOCK_LATENT_FRAMES
    front = (cond_latents - 1) * VAE_TEMPORAL_STRIDE
    noisy = out - 1
    noisy_latents = -(-noisy // VAE_TEMPORAL_STRIDE)
    noisy_latents = -(-noisy_latents // BLOCK_LATENT_FRAMES) * BLOCK_LATENT_FRAMES
    return RefineLayout(out, front, noisy_latents * VAE_TEMPORAL_STRIDE - noisy, cond_latents)


def upsample_video(
    frames: np.ndarray, size: tuple[int, int], out_frames: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 [F, h, w, 3] -> float32 [1, 3, out_frames, H, W] in [-1, 1] on ``device``: bilinear to
    ``size`` frame by frame, then trilinear in time to ``out_frames`` (corner-aligned both, so the first
    and last frames and the corners keep their values)."""
    x = torch.from_numpy(np.require(frames, requirements=["C", "W"])).to(device).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True) / 255
    x = x.permute(1, 0, 2, 3)[None]
    if out_frames != len(frames):
        x = F.interpolate(x, size=(out_frames, *size), mode="trilinear", align_corners=True)
    return x * 2 - 1


def refine_start_frame(image: np.ndarray, stage: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3]: the part of the start image the ``stage`` (h, w) video began from (the centre
    crop ``fit_start_image`` took) resized to ``size``, so it lines up with the upsampled video."""
    box = center_crop_box(*image.shape[:2], *stage)
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC, box=box))


@torch.no_grad()
def refine_latents(
    vae: torch.nn.Module,
    frames: np.ndarray,
    start: np.ndarray,
    layout: RefineLayout,
    strength: float,
    seed: int,
) -> torch.Tensor:
    """fp32 [1, 16, T, H/8, W/8] a refinement starts from: the upsampled, padded ``frames`` encoded and
    brought to noise ``strength`` (noise from ``seed``), the encoded ``start`` frame [H, W, 3] (repeated
    over the condition block) in front."""
    size = start.shape[:2]
    video = upsample_video(frames, size, layout.frames, vae.device)
    first, last = video[:, :, :1], video[:, :, -1:]
    video = torch.cat(
        [first.expand(-1, -1, layout.front, -1, -1), video, last.expand(-1, -1, layout.back, -1, -1)], 2
    )
    clean = encode_pixels(vae, video)
    noise = initial_noise(clean.shape[1:], [seed]).to(clean.device)
    latents = (1 - strength) * clean + strength * noise
    pixels = (
        torch.from_numpy(np.require(start, requirements=["C", "W"])).to(vae.device).permute(2, 0, 1).float()
        / 255
        * 2
        - 1
    )
    condition = pixels[None, :, None].expand(-1, -1, 1 + layout.front, -1, -1)
    latents[:, :, : layout.cond_latents] = encode_pixels(vae, condition)
    return latents


@contextmanager
def refine_attention(model: torch.nn.Module, implementation: str) -> Iterator[str]:
    """The model's self-attention set to ``implementation`` for the block (yields the one used):
    ``block_sparse`` becomes dense SDPA, with a warning, where its kernel cannot run."""
    dit = transformer_of(model)
    chosen = implementation
    if implementation == "block_sparse":
        weight = next(dit.parameters())
        missing = block_sparse_kernel_missing(weight.device, weight.dtype, dit.config.head_dim)
        if missing:
            log.warning(
                "refinement: no block-sparse attention kernel here (%s): dense attention, slower", missing
            )
            chosen = "sdpa"
    before = dit.attention_implementation
    dit.attention_implementation = chosen
    try:
        yield chosen
    finally:
        dit.attention_implementation = before


@torch.no_grad()
def refine_videos(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    videos: np.ndarray,
    image: np.ndarray,
    prompt_embeds: Sequence[torch.Tensor],
    settings: RefineSettings,
    *,
    on_step: StepCallback | None = None,
    progress: bool = True,
    visiting: Visiting = nullcontext,
    tiled_decode: bool = False,
) -> np.ndarray:
    """uint8 [B, F', H, W, 3]: B finished videos [B, F, h, w, 3] of the start image ``image`` (the
    original, any size) refined at their bucket of ``settings.area``; F' = F, or 2F with
    ``settings.temporal``. Video i uses prompt embedding ``prompt_embeds[i]`` [L, D] and seed
    ``settings.seed + i``.

    ``model`` is used as it is: the caller applies the refinement LoRA (and takes it off after); the
    self-attention is switched to ``settings.attention`` for the stage. ``visiting(vae)`` holds the VAE
    where it runs while it encodes and decodes; ``tiled_decode`` decodes in spatial tiles.
    """
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
        raise ValueError(
            f"refine_videos wants uint8 videos [B, F, H, W, 3], got {videos.dtype} {videos.shape}"
        )
    if len(prompt_embeds) != len(videos):
        raise ValueError(f"{len(videos)} videos need as many prompts, got {len(prompt_embeds)}")
    stage = videos.shape[2:4]
    size = refine_bucket(*stage, settings.area)
    layout = refine_layout(videos.shape[1], temporal=settings.temporal)
    start = refine_start_frame(image, stage, size)
    device = next(model.parameters()).device
    refined = []
    with refine_attention(model, settings.attention):
        for i, (frames, embeds) in enumerate(zip(videos, prompt_embeds, strict=True)):
            with visiting(vae) as on_device:
                latents = refine_latents(
                    on_device, frames, start, layout, settings.strength, settings.seed + i
                )
            latents = latents.to(device)
            text, mask = pad_text_embeds([embeds.to(device, torch.float32)])
            cond = latents[:, :, : layout.cond_latents]
            noisy = euler_loop(
                model,
                cond,
                latents[:, :, layout.cond_latents :],
                text,
                mask,
                refine_scheduler(settings.steps, settings.shift, settings.strength),
                desc="refining",
                on_step=on_step,
                progress=progress,
            )
            video = decode_videos(vae, torch.cat([cond, noisy], dim=2), visiting=visiting, tiled=tiled_decode)
            refined.append(video[0, layout.front : layout.front + layout.frames])
    return np.stack(refined)
