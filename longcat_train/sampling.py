"""Image-to-video sampling: the schedule, guidance, start-image fitting and the denoising loop.

The sampler follows the official LongCat-Video I2V pipeline: the start image, fitted to the nearest
aspect bucket, is VAE-encoded alone and normalised; it is latent frame 0 of every DiT input (timestep 0,
``num_cond_latents=1``), so the first frame never drifts. The remaining latent frames start as noise
and follow flow-match Euler steps over ``linspace(1, 0.001, steps)`` sigmas shifted by ``shift`` (12 at
480p), or with ``distill`` over the distilled model's grid (``distill_sigmas``). With guidance > 1 the
conditional and unconditional (empty prompt) passes run as one batch and are combined with CFG-Zero*.
The DiT predicts ``x0 - eps``; the flow velocity ``dx/dsigma`` is its negative. ``euler_loop`` is that
loop for every stage (the 720p refinement in ``longcat_train.refine`` runs it too).

``generate_videos`` is the whole path from start image to frames; the command's ``Sampler``, the
preview page and the trainer's validation all sample through it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from longcat_data.buckets import (
    VAE_TEMPORAL_STRIDE,
    InputTooSmall,
    aspect_distance,
    choose_bucket,
    clip_frames,
    cover_scale,
    latent_frames,
    make_buckets,
)
from longcat_data.defaults import (
    DEFAULT_AREA,
    DEFAULT_GUIDANCE,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    DISTILL_STEPS,
)
from longcat_data.encode import decode_latents, encode_image, pad_text_embeds
from longcat_data.video import ImageTooLarge, VideoError, read_image, resize_center_crop
from longcat_train.config import VideoSettings
from longcat_train.kv_cache import cache_condition

log = logging.getLogger(__name__)

# Sampling may enlarge a start image a little (unlike data prep, which never invents pixels), but past
# 2x most of the condition frame would be interpolation and the video inherits the blur.
MAX_UPSCALE = 2.0
# Cropping a start image to its bucket may drop at most half of it; beyond that the video would start
# from a different picture than the one the user chose.
MIN_KEPT_FRACTION = 0.5

StepCallback = Callable[[int, int], None]
LatentsCallback = Callable[[int, torch.Tensor], None]
# Holds a module where it runs for the duration of the block (the sampler's offload); default: in place.
Visiting = Callable[[torch.nn.Module], AbstractContextManager[torch.nn.Module]]


# The distilled model learnt sigmas on a grid of this many points, 1/50 apart (1.0, 0.98, ..., 0.02).
DISTILL_GRID = 50
# The official continuation's high-frequency tail: below this timestep the plain schedule is replaced by
# this many evenly spaced steps down to (not including) 0, spending more steps on fine detail.
HF_TAIL_START = 500.0
HF_TAIL_STEPS = 10


class SampleInputError(ValueError):
    """Input the sampler refuses; the message is one line a user can act on."""


# ---------------------------------------------------------------- schedule and guidance


def distill_sigmas(steps: int) -> torch.Tensor:
    """The distilled schedule's sigmas before the shift: ``steps`` points of its grid k / 50, k = 50 .. 1,
    evenly spaced from the top (point ``floor(j * 50 / steps)`` for j < steps): 1.0, 0.94, 0.88, ...
    for 16 steps. More steps than the grid holds would repeat sigmas, so they are refused."""
    if not 1 <= steps <= DISTILL_GRID:
        raise SampleInputError(
            f"distilled sampling takes 1 to {DISTILL_GRID} steps (its sigma grid), got {steps}; "
            f"{DISTILL_STEPS} is the official setting"
        )
    grid_points = [DISTILL_GRID - j * DISTILL_GRID // steps for j in range(steps)]
    return torch.tensor(grid_points, dtype=torch.float32) / DISTILL_GRID


def flow_scheduler(
    steps: int, shift: float = DEFAULT_SHIFT, *, distill: bool = False
) -> FlowMatchEulerDiscreteScheduler:
    """Flow-match Euler over ``linspace(1, 0.001, steps)`` (``distill``: :func:`distill_sigmas`) shifted:
    s' = shift*s / (1 + (shift-1)*s).

    ``scheduler.sigmas`` holds the ``steps`` shifted sigmas and a final 0; ``scheduler.timesteps`` is
    1000 * sigma. Built fresh per video because the scheduler counts its own steps.
    """
    if steps < 1:
        raise SampleInputError(f"steps must be at least 1, got {steps}")
    # torch's float32 linspace, as upstream builds it (numpy's differs in the last bit for some steps).
    sigmas = distill_sigmas(steps) if distill else torch.linspace(1.0, 0.001, steps)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, sigmas=sigmas.numpy())
    return scheduler


def refine_scheduler(steps: int, shift: float, strength: float) -> FlowMatchEulerDiscreteScheduler:
    """The plain schedule of ``steps`` entered part way: a first step from sigma ``strength`` (the noise
    level a refined video starts at), then the schedule's own sigmas below it, then 0."""
    if not 0.0 < strength <= 1.0:
        raise SampleInputError(f"the refinement strength must be in (0, 1], got {strength}")
    scheduler = flow_scheduler(steps, shift)
    start = torch.tensor(strength * 1000, dtype=torch.float32)
    timesteps = torch.cat([start[None], scheduler.timesteps[scheduler.timesteps < start]])
    scheduler.timesteps = timesteps
    # sigma = timestep / 1000 for every step, as upstream recomputes them after the cut.
    scheduler.sigmas = torch.cat([timesteps / 1000, torch.zeros(1)])
    return scheduler


def high_frequency_tail(scheduler: FlowMatchEulerDiscreteScheduler) -> FlowMatchEulerDiscreteScheduler:
    """``scheduler``'s timesteps above ``HF_TAIL_START``, then ``HF_TAIL_STEPS`` evenly spaced ones from
    it towards 0 (500, 450, ..., 50), then sigma 0: the official continuation's schedule
    (``enhance_hf``) for the plain, undistilled model."""
    kept = scheduler.timesteps[scheduler.timesteps > HF_TAIL_START]
    tail = np.linspace(HF_TAIL_START, 0.0, HF_TAIL_STEPS, endpoint=False, dtype=np.float32)
    timesteps = torch.cat([kept, torch.from_numpy(tail)])
    scheduler.timesteps = timesteps
    scheduler.sigmas = torch.cat([timesteps / 1000, torch.zeros(1)])
    return scheduler


def cfg_zero_star(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG-Zero*: ``st * u + g * (c - st * u)`` with ``st = <c, u> / ||u||^2`` per sample.

    ``st`` rescales the unconditional prediction onto the conditional one before guiding, which keeps
    early, inaccurate steps from overshooting. Computed over the whole prediction, condition frame
    included, as upstream does.
    """
    batch = cond.shape[0]
    c = cond.reshape(batch, -1).float()
    u = uncond.reshape(batch, -1).float()
    st = (c * u).sum(dim=1) / (u.square().sum(dim=1) + 1e-8)
    st = st.view(batch, *([1] * (cond.ndim - 1)))
    return st * uncond + guidance * (cond - st * uncond)


def round_frames(frames: int) -> int:
    """A 4k+1 frame count (the VAE's temporal stride): others are rounded down, with a warning, as every
    command does (``buckets.clip_frames``); fewer than 5 frames are refused."""
    if frames < 1 + VAE_TEMPORAL_STRIDE:
        raise SampleInputError(f"frames must be at least {1 + VAE_TEMPORAL_STRIDE}, got {frames}")
    return clip_frames(frames, "frames")


# ---------------------------------------------------------------- start image


def read_start_image(source: str | Path | bytes, name: str = "upload") -> np.ndarray:
    """``read_image`` for the sampler: a start image (a file, or its bytes named ``name``) as uint8
    [H, W, 3] RGB, upright; a missing, unreadable or too large one is a SampleInputError."""
    if not isinstance(source, bytes) and Path(source).is_dir():
        raise SampleInputError(f"start image {source} is a folder; give an image file")
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise SampleInputError(f"start image not found: {source}")
    try:
        return read_image(source, name)
    except ImageTooLarge as err:
        raise SampleInputError(str(err)) from err
    except VideoError as err:
        raise SampleInputError(
            f"{err.path} is not an image that can be read (PNG, JPEG or WebP expected)"
        ) from err


def fit_start_image(image: np.ndarray, area: tuple[int, int] = DEFAULT_AREA) -> np.ndarray:
    """Resize and centre-crop a start image to the bucket of ``area`` nearest its aspect ratio."""
    return resize_center_crop(image, *fitting_bucket(*image.shape[:2], area, "start image"))[0]


def fitting_bucket(h: int, w: int, area: tuple[int, int], what: str) -> tuple[int, int]:
    """The bucket of ``area`` nearest ``h x w`` pixels (``what``: the start image, a video), refused
    (SampleInputError naming ``what``) when it would crop away most of it or need over 2x upscaling."""
    buckets = make_buckets(area)
    try:
        bucket = choose_bucket(h, w, buckets, allow_upscale=True)
    except InputTooSmall as err:  # raised only for sizes that are not positive
        raise SampleInputError(f"{what}: {err}") from err
    kept = math.exp(-aspect_distance(h, w, bucket))
    if kept < MIN_KEPT_FRACTION:
        raise SampleInputError(
            f"{what} {w}x{h} (WxH) has an extreme aspect ratio {max(w, h) / min(w, h):.1f}:1; its nearest "
            f"bucket {bucket[1]}x{bucket[0]} would crop away {1 - kept:.0%} of it. Crop it to at most "
            f"{max(bucket) / min(bucket):.0f}:1 first"
        )
    scale = cover_scale(h, w, bucket)
    if scale > MAX_UPSCALE:
        least_w, least_h = math.ceil(bucket[1] / MAX_UPSCALE), math.ceil(bucket[0] / MAX_UPSCALE)
        raise SampleInputError(
            f"{what} {w}x{h} (WxH) is too small for --size {area[0]}x{area[1]}: its bucket {bucket[1]}x{bucket[0]} "
            f"would need {scale:.1f}x upscaling (at most {MAX_UPSCALE:g}x, so at least {least_w}x{least_h}). "
            f"Use a larger {what} or a smaller --size"
        )
    if scale > 1.0:
        log.info("%s %dx%d upscaled %.2fx to its bucket %dx%d", what, w, h, scale, bucket[1], bucket[0])
    return bucket


# ---------------------------------------------------------------- denoising


def _model_device(model: torch.nn.Module) -> torch.device:
    # The embedders stay on the compute device even when block swap parks the blocks on the CPU.
    return next(model.parameters()).device


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """fp32 noise [B, *shape]; sample i comes from its own CPU generator seeded ``seeds[i]``.

    Per-sample CPU generators make a video depend only on its own seed: the same on any device and
    whatever else shares its batch.
    """
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise)


@torch.no_grad()
def denoise(
    model: torch.nn.Module,
    cond_latents: torch.Tensor,
    prompt_embeds: Sequence[torch.Tensor],
    negative_embeds: torch.Tensor | None,
    *,
    frames: int,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    shift: float = DEFAULT_SHIFT,
    seeds: Sequence[int] = (0,),
    distill: bool = False,
    hf_tail: bool = False,
    kv_cache: bool = False,
    desc: str = "sampling",
    on_step: StepCallback | None = None,
    on_latents: LatentsCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Latents [B, 16, T, h, w] (normalised, fp32) for B conditions and prompts.

    ``cond_latents`` [B, 16, C, h, w] are the encoded condition: the start frame (C = 1) or the last
    frames of a video to continue; ``prompt_embeds`` B real-token embeddings [L_i, D];
    ``negative_embeds`` [L, D] is the empty prompt's, required when guidance > 1. ``distill``: the
    distilled model's sigma schedule; ``hf_tail``: :func:`high_frequency_tail` on the plain one;
    ``kv_cache``: the condition's keys and values computed once (``euler_loop``). ``on_step(i, steps)``
    is called after each step; ``on_latents(i, latents)`` sees the full latents (condition included)
    at step i.
    """
    batch = cond_latents.shape[0]
    if len(prompt_embeds) != batch or len(seeds) != batch:
        raise ValueError(
            f"{batch} start frames need as many prompts and seeds, got {len(prompt_embeds)}, {len(seeds)}"
        )
    use_cfg = guidance > 1.0
    if use_cfg and negative_embeds is None:
        raise ValueError("guidance > 1 needs the empty negative prompt's embedding")
    # Latents and text stay fp32 here: the DiT casts its inputs to its own dtype, as upstream does.
    device = _model_device(model)
    cond = cond_latents.to(device, torch.float32)
    _, channels, _, h, w = cond.shape

    # The unconditional half comes first, as upstream orders it; one forward serves both halves.
    texts = ([negative_embeds] * batch if use_cfg else []) + list(prompt_embeds)
    text, mask = pad_text_embeds([t.to(device, torch.float32) for t in texts])

    noisy_frames = latent_frames(frames) - cond.shape[2]
    if noisy_frames < 1:
        raise SampleInputError(
            f"{frames} frames leave no latent frame to generate after {cond.shape[2]} condition latents"
        )
    noisy = initial_noise((channels, noisy_frames, h, w), seeds).to(device)
    scheduler = flow_scheduler(steps, shift, distill=distill)
    if hf_tail:
        scheduler = high_frequency_tail(scheduler)
    noisy = euler_loop(
        model,
        cond,
        noisy,
        text,
        mask,
        scheduler,
        guidance=guidance,
        kv_cache=kv_cache,
        desc=desc,
        on_step=on_step,
        on_latents=on_latents,
        progress=progress,
    )
    return torch.cat([cond, noisy], dim=2)


def euler_loop(
    model: torch.nn.Module,
    cond: torch.Tensor,
    noisy: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    *,
    guidance: float = 1.0,
    kv_cache: bool = False,
    desc: str = "sampling",
    on_step: StepCallback | None = None,
    on_latents: LatentsCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """The noisy latents [B, 16, T, h, w] after every step of ``scheduler``, the clean condition
    latents [B, 16, C, h, w] in front of them at each model call (``num_cond_latents`` = C).

    ``text`` / ``mask`` are the padded prompt embeddings; with guidance > 1 they hold the B
    unconditional rows first, then the B conditional ones, and both halves run as one batch.
    ``kv_cache``: the condition's keys and values are computed once (``kv_cache.cache_condition``) and
    the model is given the noisy frames alone; CFG-Zero* then weighs the noisy frames' predictions only,
    as the official cached loop does.
    """
    use_cfg = guidance > 1.0
    steps = len(scheduler.timesteps)
    num_cond = cond.shape[2]
    cache = cache_condition(model, cond, text[-cond.shape[0] :], mask) if kv_cache and num_cond else None
    cached = {} if cache is None else {"cond_cache": cache}
    for i, t in enumerate(tqdm(scheduler.timesteps, desc=desc, unit="step", disable=not progress)):
        # The clean condition frames are put back in front of the noisy frames at every step.
        latents = torch.cat([cond, noisy], dim=2)
        if on_latents is not None:
            on_latents(i, latents)
        given = noisy if cache is not None else latents
        x = torch.cat([given, given]) if use_cfg else given
        timestep = t.to(x.device).expand(x.shape[0])  # the model sets the condition frames' to 0
        pred = model(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            num_cond_latents=num_cond,
            **cached,
        ).float()
        if use_cfg:
            uncond, pred = pred.chunk(2)
            pred = cfg_zero_star(pred, uncond, guidance)
        # The DiT predicts x0 - eps; the Euler step wants d x / d sigma = eps - x0.
        noisy = scheduler.step(-pred[:, :, pred.shape[2] - noisy.shape[2] :], t, noisy).prev_sample
        if on_step is not None:
            on_step(i + 1, steps)
    return noisy


def generate_videos(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    image: np.ndarray,
    prompt_embeds: Sequence[torch.Tensor],
    negative_embeds: torch.Tensor | None,
    settings: VideoSettings,
    *,
    on_step: StepCallback | None = None,
    progress: bool = True,
    visiting: Visiting = nullcontext,
    tiled_decode: bool = False,
) -> np.ndarray:
    """uint8 [B, F, H, W, 3]: one video per prompt embedding from the same start image (any size;
    fitted to its bucket of ``settings.area``); video i uses ``settings.seed + i``.

    ``prompt_embeds``: B embeddings [L_i, D]; ``negative_embeds`` [L, D], the empty prompt's, when
    ``settings.guidance`` > 1. ``visiting(vae)`` holds the VAE where it runs while it encodes and decodes (the
    sampler's offload brings it onto the GPU only then). ``tiled_decode`` decodes in spatial tiles.
    """
    frames = round_frames(settings.frames)
    start = fit_start_image(image, settings.area)
    batch = len(prompt_embeds)
    with visiting(vae) as on_device:
        cond = encode_image(on_device, start[None]).expand(batch, -1, -1, -1, -1)
    latents = denoise(
        model,
        cond,
        prompt_embeds,
        negative_embeds,
        frames=frames,
        steps=settings.steps,
        guidance=settings.guidance,
        shift=settings.shift,
        seeds=[settings.seed + i for i in range(batch)],
        distill=settings.distill,
        on_step=on_step,
        progress=progress,
    )
    return decode_videos(vae, latents, visiting=visiting, tiled=tiled_decode)


def decode_videos(
    vae: torch.nn.Module, latents: torch.Tensor, *, visiting: Visiting = nullcontext, tiled: bool = False
) -> np.ndarray:
    """uint8 [B, F, H, W, 3] from normalised latents [B, 16, T, h, w], the VAE held where it runs by
    ``visiting``; ``tiled``: in spatial tiles (less memory)."""
    with visiting(vae) as on_device:
        if tiled:
            on_device.enable_tiling()
        try:
            # One video at a time: decoding memory grows with the batch, and the batch gains nothing.
            videos = [decode_latents(on_device, latents[i : i + 1])[0].numpy() for i in range(len(latents))]
        finally:
            if tiled:
                on_device.disable_tiling()
    return np.stack(videos)
