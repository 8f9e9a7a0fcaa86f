"""Video continuation and long videos: segments conditioned on the last frames of what came before.

As the official pipeline (``generate_vc`` and its long-video demo): the last N (4k+1, 13) frames of a
video, fitted to the bucket of the sampling area, are VAE-encoded to (N-1)/4+1 clean latent frames that
lead every DiT input at timestep 0 (``num_cond_latents``); the other latent frames start as noise and
follow the I2V loop (``sampling.denoise``: the same schedules and CFG-Zero*), with the official
continuation's high-frequency tail on the plain schedule and, by default, the condition's keys and
values computed once (``longcat_train.kv_cache``). A continuation of F frames is the N condition frames
as given, then the F - N new ones. A long video chains K segments: the first from a start image
(``sampling.generate_videos``) or a video, each next one conditioned on the last N frames of the one
before, so it holds F + (K-1)(F-N) frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from longcat_data.buckets import VAE_TEMPORAL_STRIDE, latent_frames
from longcat_data.encode import encode_video
from longcat_data.video import VideoError, probe, read_frames, resize_center_crop
from longcat_train.config import VideoSettings
from longcat_train.sampling import (
    SampleInputError,
    StepCallback,
    Visiting,
    decode_videos,
    denoise,
    fitting_bucket,
    flow_scheduler,
    generate_videos,
    high_frequency_tail,
)

log = logging.getLogger(__name__)

# Sees the whole video made so far (uint8 [F, H, W, 3]) after each segment: the sampler writes it then.
SegmentCallback = Callable[[np.ndarray], None]


def check_cond_frames(cond_frames: int, frames: int) -> None:
    """SampleInputError unless ``cond_frames`` is 4k+1 and leaves ``frames`` (4k+1) something to make."""
    if cond_frames < 1 or (cond_frames - 1) % VAE_TEMPORAL_STRIDE:
        raise SampleInputError(
            f"--cond-frames {cond_frames}: must be 4k+1 (whole latent frames): use "
            f"{max(1, (cond_frames - 1) // VAE_TEMPORAL_STRIDE * VAE_TEMPORAL_STRIDE + 1)} or "
            f"{max(1, (cond_frames + 2) // VAE_TEMPORAL_STRIDE * VAE_TEMPORAL_STRIDE + 1)}"
        )
    if cond_frames >= frames:
        raise SampleInputError(
            f"--cond-frames {cond_frames} is not fewer than --frames {frames}: a segment must have new "
            f"frames after its condition; use a smaller --cond-frames or more --frames"
        )


def segment_prompts(prompts: Sequence[str], segments: int) -> list[str]:
    """One prompt per segment: a single prompt for all of them, or one each."""
    if len(prompts) == 1:
        return list(prompts) * segments
    if len(prompts) != segments:
        raise SampleInputError(
            f"{len(prompts)} prompts for {segments} segment{'s' if segments > 1 else ''}: give one --prompt "
            f"for every segment, or a single one for all (or set --segments {len(prompts)})"
        )
    return list(prompts)


def read_condition_video(path: str | Path, cond_frames: int, fps: float, area: tuple[int, int]) -> np.ndarray:
    """The last ``cond_frames`` frames of the video at ``path`` read at ``fps``, resized and centre-cropped
    to the bucket of ``area`` nearest its shape: uint8 [N, H, W, 3]. SampleInputError (one line naming
    the file and the fix) when it is missing, unreadable, too short or too small."""
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "not found"
        raise SampleInputError(f"--video {path}: {what}; give the path of a video file")
    try:
        info = probe(path)
    except VideoError as err:
        raise SampleInputError(f"--video {path}: {err.reason}") from None
    available = info.frames_at(fps)
    if available < cond_frames:
        raise SampleInputError(
            f"--video {path} has {available} frames at {fps:g} fps, fewer than --cond-frames "
            f"{cond_frames}: give a longer video or a smaller --cond-frames"
        )
    bucket = fitting_bucket(info.height, info.width, area, f"video {Path(path).name}")
    try:
        frames = read_frames(path, available - cond_frames, cond_frames, fps, info=info)
    except (VideoError, ValueError) as err:  # the frames the probe promised are not all decodable
        raise SampleInputError(f"--video {path} cannot be read to its end ({err}); re-encode it") from None
    return resize_center_crop(frames, *bucket)[0]


def step_count(settings: VideoSettings, *, continuation: bool) -> int:
    """Model calls of one segment: the schedule's steps, with the high-frequency tail for a
    continuation on the plain schedule."""
    scheduler = flow_scheduler(settings.steps, settings.shift, distill=settings.distill)
    if continuation and not settings.distill:
        scheduler = high_frequency_tail(scheduler)
    return len(scheduler.timesteps)


def continue_videos(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    cond_frames: np.ndarray,
    prompt_embeds: Sequence[torch.Tensor],
    negative_embeds: torch.Tensor | None,
    settings: VideoSettings,
    *,
    desc: str = "continuing",
    on_step: StepCallback | None = None,
    progress: bool = True,
    visiting: Visiting = nullcontext,
    tiled_decode: bool = False,
) -> np.ndarray:
    """uint8 [B, F, H, W, 3]: one continuation of ``cond_frames`` (uint8 [N, H, W, 3], already on a
    bucket; N 4k+1) per prompt embedding; video i uses ``settings.seed + i``. Its first N frames are
    ``cond_frames`` themselves, the rest decoded."""
    count = len(cond_frames)
    check_cond_frames(count, settings.frames)
    batch = len(prompt_embeds)
    with visiting(vae) as on_device:
        cond = encode_video(on_device, cond_frames[None]).expand(batch, -1, -1, -1, -1)
    if cond.shape[2] != latent_frames(count):
        raise ValueError(f"{count} condition frames encoded to {cond.shape[2]} latent frames")
    latents = denoise(
        model,
        cond,
        prompt_embeds,
        negative_embeds,
        frames=settings.frames,
        steps=settings.steps,
        guidance=settings.guidance,
        shift=settings.shift,
        seeds=[settings.seed + i for i in range(batch)],
        distill=settings.distill,
        hf_tail=not settings.distill,
        kv_cache=settings.kv_cache,
        desc=desc,
        on_step=on_step,
        progress=progress,
    )
    videos = decode_videos(vae, latents, visiting=visiting, tiled=tiled_decode)
    videos[:, :count] = cond_frames
    return videos


def generate_long_video(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    segment_embeds: Sequence[torch.Tensor],
    negative_embeds: torch.Tensor | None,
    settings: VideoSettings,
    *,
    image: np.ndarray | None = None,
    video: np.ndarray | None = None,
    on_step: StepCallback | None = None,
    on_segment: SegmentCallback | None = None,
    progress: bool = True,
    visiting: Visiting = nullcontext,
    tiled_decode: bool = False,
) -> np.ndarray:
    """uint8 [F + (K-1)(F-N), H, W, 3]: K = ``len(segment_embeds)`` segments of F = ``settings.frames``,
    the first from the start ``image`` (any size; image-to-video) or continuing ``video`` (uint8 [N, H, W,
    3] on a bucket, N = ``settings.cond_frames``: :func:`read_condition_video`), each next one continuing
    the last N frames of the one before. Segment s uses prompt ``segment_embeds[s]`` and seed
    ``settings.seed + s``. ``on_step(done, total)`` counts the steps of all segments;
    ``on_segment(frames so far)`` is called after each segment."""
    if (image is None) == (video is None):
        raise ValueError("a long video starts from an image or a video: give exactly one")
    segments = len(segment_embeds)
    n = settings.cond_frames
    check_cond_frames(n, settings.frames)
    steps = [step_count(settings, continuation=video is not None or s > 0) for s in range(segments)]
    made = 0

    def counted(i: int, _: int) -> None:
        if on_step is not None:
            on_step(made + i, sum(steps))

    common = dict(on_step=counted, progress=progress, visiting=visiting, tiled_decode=tiled_decode)
    parts: list[np.ndarray] = []
    condition = video
    for s in tqdm(range(segments), desc="segments", unit="segment", disable=not progress or segments == 1):
        seeded = replace(settings, seed=settings.seed + s)
        desc = f"segment {s + 1}/{segments}"
        if condition is None:
            frames = generate_videos(
                model, vae, image, [segment_embeds[s]], negative_embeds, seeded, **common
            )
        else:
            frames = continue_videos(
                model, vae, condition, [segment_embeds[s]], negative_embeds, seeded, desc=desc, **common
            )
        # A continuation's first N frames are its condition, already in the video (or the input's own).
        parts.append(frames[0] if s == 0 else frames[0, n:])
        condition = frames[0, -n:]
        made += steps[s]
        if on_segment is not None:
            on_segment(np.concatenate(parts))
    return np.concatenate(parts)
