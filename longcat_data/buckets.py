"""Aspect buckets and frame-count rules: pure functions, no I/O.

A bucket is an output size ``(height, width)``. Every clip is resized (never stretched) to cover its
bucket and centre-cropped, so all clips in a bucket batch together. Frame counts follow the VAE's
temporal stride: F frames become ``1 + (F - 1) // 4`` latent frames, so F is always 4k+1.
"""

from __future__ import annotations

import functools
import logging
import math

log = logging.getLogger(__name__)

# The VAE downsamples 8x and the DiT patchifies 2x2, so any side must divide by 16.
MODEL_SIDE_MULTIPLE = 16
VAE_TEMPORAL_STRIDE = 4
MIN_FRAMES = 1 + VAE_TEMPORAL_STRIDE

Bucket = tuple[int, int]


class InputTooSmall(ValueError):
    """The source has too few frames or pixels for any bucket; the message is the one-line reason."""


def make_buckets(
    area: Bucket = (480, 832),
    grid: int = 64,
    max_aspect: float = 4.0,
) -> list[Bucket]:
    """Buckets ``(h, w)`` with sides on ``grid`` and pixel count close to ``area[0] * area[1]``.

    For each short side on the grid the long side is the grid multiple nearest to the target area, so
    the area error is at most ``grid / 2`` over the long side. Both orientations and the square are
    included; ratios beyond ``max_aspect`` are dropped. The target itself and its transpose are always
    buckets, even off the grid (480 is not a multiple of 64), because users name them; they must still
    be multiples of 16 for the model. Sorted by aspect ratio h/w, portrait first.
    """
    target_h, target_w = area
    if grid <= 0 or grid % MODEL_SIDE_MULTIPLE:
        raise ValueError(f"grid must be a positive multiple of {MODEL_SIDE_MULTIPLE}, got {grid}")
    if target_h % MODEL_SIDE_MULTIPLE or target_w % MODEL_SIDE_MULTIPLE or min(area) <= 0:
        raise ValueError(
            f"area {target_h}x{target_w}: both sides must be positive multiples of {MODEL_SIDE_MULTIPLE}"
        )
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")

    pixels = target_h * target_w
    buckets: set[Bucket] = {(target_h, target_w), (target_w, target_h)}
    short = grid
    while short * short <= pixels * 1.25:
        long = max(grid, round(pixels / short / grid) * grid)
        if long >= short and long / short <= max_aspect:
            buckets.add((short, long))
            buckets.add((long, short))
        short += grid
    return sorted(buckets, key=lambda hw: (hw[0] / hw[1], hw[0]))


def aspect_distance(h: int, w: int, bucket: Bucket) -> float:
    """Distance between two aspect ratios on a log scale, so 2:1 and 1:2 are equally far from 1:1."""
    return abs(math.log(h / w) - math.log(bucket[0] / bucket[1]))


def cover_scale(h: int, w: int, bucket: Bucket) -> float:
    """Factor that makes an h x w frame just cover the bucket (> 1 means upscaling)."""
    return max(bucket[0] / h, bucket[1] / w)


def choose_bucket(h: int, w: int, buckets: list[Bucket], allow_upscale: bool = False) -> Bucket:
    """The bucket nearest in aspect ratio to an h x w source (ties go to the smaller area).

    Rule for small sources: the frame is resized by ``cover_scale`` to cover the bucket; a scale above
    1.0 would invent pixels, so without ``allow_upscale`` such a source raises ``InputTooSmall`` naming
    the size it would need. Only the nearest-aspect bucket is considered: falling back to a far aspect
    would crop away most of the frame. A source with no pixels raises InputTooSmall too.
    """
    if h <= 0 or w <= 0:
        raise InputTooSmall(f"{w}x{h} (WxH) has no pixels")
    if not buckets:
        raise ValueError("no buckets to choose from")
    bucket = min(buckets, key=lambda b: (aspect_distance(h, w, b), b[0] * b[1]))
    scale = cover_scale(h, w, bucket)
    if scale > 1.0 and not allow_upscale:
        need_h, need_w = math.ceil(h * scale), math.ceil(w * scale)
        raise InputTooSmall(
            f"{w}x{h} (WxH) is smaller than its bucket {bucket[1]}x{bucket[0]}: it would need {scale:.2f}x "
            f"upscaling (at least {need_w}x{need_h}); use a smaller --area or a larger source"
        )
    return bucket


def trim_to_4k_plus_1(available: int, max_frames: int = 93) -> int:
    """Largest 4k+1 frame count <= min(available, max_frames); fewer than 5 frames raise InputTooSmall."""
    if max_frames < MIN_FRAMES:
        raise ValueError(f"max_frames must be >= {MIN_FRAMES}, got {max_frames}")
    usable = min(available, max_frames)
    if usable < MIN_FRAMES:
        raise InputTooSmall(f"only {available} frames; a clip needs at least {MIN_FRAMES}")
    return floor_4k_plus_1(usable)


def floor_4k_plus_1(frames: int) -> int:
    """The largest 4k+1 frame count <= ``frames`` (``frames`` >= 1)."""
    return frames - (frames - 1) % VAE_TEMPORAL_STRIDE


def clip_frames(frames: int, setting: str = "frames") -> int:
    """``frames`` as a clip length, the one rule of every command: a count that is not 4k+1 is rounded
    down to one (a clip cannot gain frames its video does not have), with one warning line naming
    ``setting``. Counts below MIN_FRAMES are returned unchanged for the caller's check to refuse."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < MIN_FRAMES:
        return frames
    rounded = floor_4k_plus_1(frames)
    if rounded != frames:
        _warn_once(f"{setting} must be 4k+1 for the VAE: using {rounded} instead of {frames}")
    return rounded


@functools.cache
def _warn_once(message: str) -> None:
    # Configs are rebuilt several times while one command parses (a config file, the resumed run's).
    log.warning(message)


def clip_starts(available: int, clip_frames: int, max_clips: int = 1, stride: int | None = None) -> list[int]:
    """Start frames of up to ``max_clips`` clips of ``clip_frames`` that fit in ``available`` frames.

    Clips start every ``stride`` frames (default ``clip_frames``: back to back, no overlap), the first at
    frame 0. An empty list means not even one clip fits.
    """
    if clip_frames <= 0 or max_clips <= 0:
        raise ValueError(f"clip_frames and max_clips must be positive, got {clip_frames}, {max_clips}")
    step = clip_frames if stride is None else stride
    if step <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    last_start = available - clip_frames
    return list(range(0, last_start + 1, step))[:max_clips] if last_start >= 0 else []


def latent_frames(frames: int) -> int:
    """Latent frames the VAE produces for ``frames`` video frames: 1 + (F - 1) // 4."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    return 1 + (frames - 1) // VAE_TEMPORAL_STRIDE
