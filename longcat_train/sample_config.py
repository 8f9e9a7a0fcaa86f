"""The config of ``longcat-sample`` (``SampleConfig``) and the limits one video may ask for.

Each field is a flag (``longcat_data.flags``), as in ``longcat_train.config``. This module imports no torch
or model library, so parsing flags and ``--help`` stay instant.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from longcat_data.buckets import MIN_FRAMES
from longcat_data.defaults import (
    DEFAULT_AREA,
    DEFAULT_COND_FRAMES,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_MODEL,
    DEFAULT_REFINE_AREA,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    DISTILL_GUIDANCE,
    DISTILL_STEPS,
    default_area,
    default_frames,
    default_refine_area,
)
from longcat_data.flags import (
    Check,
    at_least,
    format_area,
    number,
    option,
    parse_area,
)
from longcat_train.architecture import ATTENTION_BACKENDS, BLOCK_LINEARS
from longcat_train.checks import (
    AREA_ON_GRID,
    COND_FRAMES,
)
from longcat_train.lora_spec import LORA_SPECS, STRENGTH_RANGE
from longcat_train.video_settings import RefineSettings, VideoSettings

__all__ = ["SAMPLE_LIMITS", "SampleConfig"]

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = BLOCK_LINEARS
BASE_PRECISIONS = ("no_change", "bf16", "int8-quanto", "fp8-torchao")

log = logging.getLogger(__name__)


# What one video may ask for, on the command line and on the preview page alike (inclusive): past these a
# value is a typo, or a run that fails (out of memory, a seed that overflows) after the models loaded.
SAMPLE_LIMITS: dict[str, tuple[float, float]] = {
    "frames": (MIN_FRAMES, 257),
    "steps": (1, 200),
    "guidance": (0.0, 20.0),
    "lora_strength": STRENGTH_RANGE,
    "seed": (0, 2**63 - 1),
    "fps": (1, 240),
    "port": (0, 65535),
    "segments": (1, 100),
}


def _within_limits(name: str) -> Check:
    return number(*SAMPLE_LIMITS[name])


def _utf8(text: str | list[str]) -> bool:
    for item in [text] if isinstance(text, str) else text:
        item.encode("utf-8")
    return True


UTF8_TEXT = Check(_utf8, "UTF-8 text (set a UTF-8 locale or type it again)")


@dataclass
class SampleConfig:
    """What ``longcat-sample`` does; one field per flag. ``None`` sizes mean the model's defaults."""

    model: str = option(DEFAULT_MODEL, "'tiny', a checkpoint directory or a hub id")
    image: str | None = option(
        None, "start frame (PNG, JPEG or WebP); resized and cropped to the nearest bucket"
    )
    video: str | None = option(
        None,
        "a video to continue instead of --image: its last --cond-frames frames (at --fps), fitted to the "
        "nearest bucket, are the condition",
        group="continuation and long video",
    )
    cond_frames: int = option(
        DEFAULT_COND_FRAMES,
        "frames of the video (or of the previous segment) a continuation is conditioned on; 4k+1, "
        "fewer than --frames",
        check=COND_FRAMES,
        group="continuation and long video",
    )
    segments: int = option(
        1,
        "chain this many segments into one video, each continuing the last --cond-frames frames of the "
        "one before: --frames + (segments - 1) * (--frames - --cond-frames) frames; --prompt once, or "
        "once per segment",
        check=_within_limits("segments"),
        group="continuation and long video",
    )
    kv_cache: bool = option(
        True,
        "compute the condition frames' keys and values once per segment instead of at every step",
        group="continuation and long video",
    )
    prompts: list[str] = option(
        [],
        "what happens in the video; repeat for several videos of the same start frame (seeds seed, seed+1, ...), "
        "or with --segments for one prompt per segment",
        flag="--prompt",
        repeat=True,
        check=UTF8_TEXT,
    )
    negative_prompt: str = option(
        "", "the unconditional prompt of guidance (empty, as upstream)", check=UTF8_TEXT
    )
    output: str = option("out.mp4", "MP4 path (several prompts: out_0.mp4, ...)", aliases=("-o",))
    lora: list[str] = option(
        [],
        "PATH[:STRENGTH] of a LoRA safetensors file (ours, peft, official); repeat to sample with several "
        "at once; with --serve, the LoRAs the page offers (STRENGTH: its default there)",
        repeat=True,
        check=LORA_SPECS,
    )
    lora_strength: float = option(
        1.0, "strength of each --lora given without one", check=_within_limits("lora_strength")
    )
    frames: int | None = option(
        None,
        f"4k+1 frames (others are rounded); default {DEFAULT_FRAMES}, {default_frames('tiny')} for tiny",
        check=_within_limits("frames"),
    )
    steps: int | None = option(
        None,
        f"Euler steps; default {DEFAULT_STEPS}, {DISTILL_STEPS} with --distill",
        check=_within_limits("steps"),
    )
    guidance: float | None = option(
        None,
        f"CFG-Zero* scale, 1 = off; default {DEFAULT_GUIDANCE:g}, {DISTILL_GUIDANCE:g} with --distill",
        check=_within_limits("guidance"),
    )
    distill: bool = option(
        False,
        "the distilled sigma schedule, for the distill LoRA (give it with --lora): "
        f"{DISTILL_STEPS} steps without guidance unless --steps / --guidance say otherwise",
    )
    shift: float = option(DEFAULT_SHIFT, "sigma shift (12 at 480p)", check=number(0, low_open=True))
    seed: int = option(0, "noise seed (prompt i uses seed + i)", check=_within_limits("seed"))
    area: tuple[int, int] | None = option(
        None,
        f"bucket area HxW; the start image's shape picks the bucket (default {format_area(DEFAULT_AREA)}, "
        f"{format_area(default_area('tiny'))} for tiny)",
        parse=parse_area,
        aliases=("--size",),
        check=AREA_ON_GRID,
    )
    fps: int = option(DEFAULT_FPS, "frame rate of the MP4", check=_within_limits("fps"))
    gif: bool = option(False, "also write a small GIF preview beside the MP4")
    save_frames: bool = option(False, "also write every frame as PNG into out/")
    vae_tiling: bool = option(False, "decode in spatial tiles: less memory, a bit slower")
    block_swap: int = option(
        0,
        "keep the last N DiT blocks in host memory and stream them in (GPUs smaller than the model)",
        metavar="N",
        check=at_least(0),
    )
    attention: str = option(
        "sdpa",
        "DiT self-attention: sdpa (dense, as the model was trained) or block_sparse (our kernel at 1/16 "
        "density: faster, a different computation; judge by eye)",
        choices=ATTENTION_BACKENDS,
        aliases=("--attention-implementation", "--attention_implementation"),
    )
    fp8_matmuls: bool = option(
        False, "float8 matmuls for the DiT's block linears, weights kept in bf16 (compute capability 8.9+)"
    )
    compile: bool = option(False, "torch.compile each DiT block step (not with --block-swap)")
    step_cache: float = option(
        0.0,
        "first-block cache threshold: reuse the later blocks' residual while the first block's output "
        "changes less than this between steps (0: off; faster, a small change to the video)",
        metavar="THRESHOLD",
        check=number(0),
    )
    device: str | None = option(None, "default: cuda if available, else cpu")
    refine: bool = option(
        False,
        "then refine each video to 720p with --refine-lora and block-sparse attention; the first video "
        "is kept beside it as OUT_<short side>p.mp4",
        group="720p refinement",
    )
    refine_lora: str | None = option(
        None,
        "the refinement LoRA (the official checkpoint's lora/refinement_lora.safetensors)",
        group="720p refinement",
    )
    refine_temporal: bool = option(
        False, "refine to twice the frames too, written at twice --fps", group="720p refinement"
    )
    refine_area: tuple[int, int] | None = option(
        None,
        f"pixel area of the refined video's bucket (sides on a 64 grid; default "
        f"{format_area(DEFAULT_REFINE_AREA)}, {format_area(default_refine_area('tiny'))} for tiny)",
        parse=parse_area,
        check=AREA_ON_GRID,
        group="720p refinement",
    )
    serve: bool = option(False, "serve the preview page instead of sampling once", group="preview page")
    host: str = option("127.0.0.1", "address the page listens on", group="preview page")
    port: int = option(
        7860,
        "port the page listens on",
        group="preview page",
        check=_within_limits("port"),
    )
    serve_dir: str = option("longcat_previews", "where the page's videos are written", group="preview page")
    max_upload_mb: float = option(
        20.0, "largest start image the page accepts", group="preview page", check=number(0, low_open=True)
    )

    def __post_init__(self) -> None:
        # The tiny model is for trying the tools on a CPU: its defaults are the demo clips' small size.
        if self.area is None:
            self.area = default_area(self.model)
        self.area = parse_area(self.area)
        if self.frames is None:
            self.frames = default_frames(self.model)
        if self.steps is None:
            self.steps = DISTILL_STEPS if self.distill else DEFAULT_STEPS
        if self.guidance is None:
            self.guidance = DISTILL_GUIDANCE if self.distill else DEFAULT_GUIDANCE
        self.refine_area = parse_area(self.refine_area or default_refine_area(self.model))

    @property
    def video_settings(self) -> VideoSettings:
        """The settings of the videos this config asks for (video i of several prompts: seed + i): the
        flags of the same names."""
        return VideoSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VideoSettings)})

    @property
    def refine_settings(self) -> RefineSettings:
        """The refinement ``--refine`` runs on those videos (video i: seed + i); the rest of it is the
        refinement's own (the official schedule, block-sparse attention)."""
        return RefineSettings(area=self.refine_area, temporal=self.refine_temporal, seed=self.seed)
