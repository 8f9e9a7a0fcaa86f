"""Values every command shares, in one place that imports nothing (``--help`` must not load torch).

Both packages read them: ``longcat_data`` (prep) and ``longcat_train`` (trainer, sampler).
"""

from __future__ import annotations

import signal

# The released checkpoint: `--model` of every command unless given.
DEFAULT_MODEL = "meituan-longcat/LongCat-Video"

# `--model tiny`: random tiny models of the real classes, the same weights everywhere (no downloads).
TINY = "tiny"
TINY_SEED = 0

# The official 480p setting: bucket area (height x width) and clip length (4k+1 frames, 24 latent frames).
DEFAULT_AREA = (480, 832)
DEFAULT_FRAMES = 93

# The generated demo clips (`longcat-prep demo`) cover buckets of this area; the tiny model's defaults.
DEMO_AREA = (192, 320)
DEMO_FRAMES = 17

# Tokens every prompt is padded to for umT5, as the official pipeline does.
TEXT_MAX_LENGTH = 512

# Sampling, as the official image-to-video demo: Euler steps, CFG-Zero* scale, sigma shift, output rate.
DEFAULT_STEPS = 40
DEFAULT_GUIDANCE = 4.0
DEFAULT_SHIFT = 12.0
DEFAULT_FPS = 15

# Video continuation, as the official pipeline: the last 13 frames (4 latent frames) of a video condition
# the next segment.
DEFAULT_COND_FRAMES = 13

# Distilled sampling (the official distill LoRA): its steps, and no guidance (it was trained without CFG).
DISTILL_STEPS = 16
DISTILL_GUIDANCE = 1.0

# The 720p refinement (the official refinement LoRA): the pixel area its buckets cover, the plain schedule
# whose tail it runs (entered at sigma REFINE_STRENGTH, the noise the upsampled video is brought back to).
DEFAULT_REFINE_AREA = (720, 1280)
REFINE_STEPS = 50
REFINE_STRENGTH = 0.5

# Writes captions only (`longcat-prep caption`, `--captions qwen`); the DiT reads umT5 embeddings of them.
DEFAULT_CAPTION_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


def default_area(model: str) -> tuple[int, int]:
    """The bucket area for ``model`` when none is given: the demo clips' size for the tiny model."""
    return DEMO_AREA if model == TINY else DEFAULT_AREA


def default_frames(model: str) -> int:
    """The clip length for ``model`` when none is given: the demo clips' length for the tiny model."""
    return DEMO_FRAMES if model == TINY else DEFAULT_FRAMES


def default_refine_area(model: str) -> tuple[int, int]:
    """The area ``--refine`` upsamples to for ``model``: twice the tiny model's sides (its CPU-sized demo)."""
    return (2 * DEMO_AREA[0], 2 * DEMO_AREA[1]) if model == TINY else DEFAULT_REFINE_AREA


# Signals that ask a long job to stop between steps: Ctrl-C, SIGTERM (schedulers, kill), SIGHUP (the
# terminal went away), SIGUSR1 (SLURM's warning before the time limit). The trainer finishes its step and
# saves; loader workers ignore them (the main process decides).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
