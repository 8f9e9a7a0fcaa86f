"""What a sampled video depends on besides the model, the start image and the prompt: plain frozen values.

``VideoSettings`` drives the image-to-video stage (``sampling.generate_videos``), ``RefineSettings`` the
720p refinement after it (``sampling.refine_videos``). The commands' configs build them from their flags
(``SampleConfig.video_settings`` / ``.refine_settings``, ``TrainConfig.validation_settings``). No torch
here: the configs import this module and ``--help`` must stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass

from longcat_data.defaults import (
    DEFAULT_AREA,
    DEFAULT_COND_FRAMES,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_REFINE_AREA,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    REFINE_STEPS,
    REFINE_STRENGTH,
)


@dataclass(frozen=True)
class VideoSettings:
    """What a sampled video depends on besides the model, the start image and the prompt: its length,
    the Euler steps, the guidance scale, the sigma shift, the noise seed, the bucket area the start
    image is fitted to, and the sigma schedule (``distill``: the distilled model's, else the plain one).
    A continuation (``longcat_train.continuation``) also takes the last ``cond_frames`` frames of the video
    it continues, and with ``kv_cache`` computes their keys and values once (guidance then weighs the new
    frames only, as the official cached loop). The same settings and inputs make the same frames."""

    frames: int = DEFAULT_FRAMES
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    shift: float = DEFAULT_SHIFT
    seed: int = 0
    area: tuple[int, int] = DEFAULT_AREA
    distill: bool = False
    cond_frames: int = DEFAULT_COND_FRAMES
    kv_cache: bool = True


@dataclass(frozen=True)
class RefineSettings:
    """What the refinement of a finished video depends on besides the model, the video, its start image
    and its prompt: the pixel area of the buckets it is upsampled to, whether its frame count doubles
    too (``temporal``: twice the frame rate), the plain schedule's ``steps`` and ``shift`` whose tail
    below ``strength`` it runs, the noise seed (video i: ``seed + i``), and the self-attention kernel
    (``block_sparse`` as the refinement LoRA was trained; dense where the kernel cannot run)."""

    area: tuple[int, int] = DEFAULT_REFINE_AREA
    temporal: bool = False
    steps: int = REFINE_STEPS
    strength: float = REFINE_STRENGTH
    shift: float = DEFAULT_SHIFT
    seed: int = 0
    attention: str = "block_sparse"
