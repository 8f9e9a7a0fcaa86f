"""The configs of the ``longcat-prep`` commands: one dataclass per command, each field a flag.

``longcat_data.cli`` builds every subcommand's flags from these (``longcat_data.flags``). This module
imports no torch, so ``longcat-prep --help`` answers at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_data.buckets import MODEL_SIDE_MULTIPLE, clip_frames
from longcat_data.defaults import DEFAULT_AREA, DEFAULT_CAPTION_MODEL, DEFAULT_FRAMES, DEFAULT_MODEL
from longcat_data.flags import ConfigError, format_area, option, parse_area, parse_size
from longcat_data.storage import is_remote, local_path

ENCODER_DTYPES = ("auto", "bf16", "fp32")
ENGINES = ("local", "ray")
CAPTION_SOURCES = (
    "sidecar (VIDEO.txt, else the file name) | filename | jsonl:FILE | csv:FILE | prompt:TEXT (one caption "
    "for every video) | qwen"
)


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def parse_captions(text: str) -> tuple[str, Path | str | None]:
    """``--captions`` value -> (the ``captions.resolve_caption`` strategy, the mapping file or None; a
    remote one as its URL)."""
    kind, _, path = text.partition(":")
    if kind in ("jsonl", "csv") and path:
        return "mapping", path if is_remote(path) else Path(path)
    if kind == "sidecar" and not path:
        return "textfile", None
    if kind == "filename" and not path:
        return "filename", None
    if kind == "qwen" and not path:
        return "captioner", None
    if kind == "prompt" and path.strip():
        return "prompt", None
    raise ConfigError(
        f"--captions must be sidecar, filename, jsonl:FILE, csv:FILE, prompt:TEXT or qwen; got {text!r}"
    )


@dataclass
class PrepConfig:
    """``longcat-prep shard``: a folder of videos into WebDataset shards."""

    videos_dir: str | None = option(
        None,
        "folder of videos, searched recursively: a path or a URL (s3://, gs://, hf://, file://); "
        "not with --simpletuner",
        positional=True,
    )
    out_dir: str | None = option(
        None,
        "where shards and manifest.json go, a path or a URL (s3://, ...); rerun to resume",
        positional=True,
        aliases=("--output-dir", "--output_dir"),
    )
    model: str = option(
        DEFAULT_MODEL, "'tiny' (random tiny encoders, no download), a checkpoint dir, or a hub id"
    )
    frames: int = option(
        DEFAULT_FRAMES,
        "frames per clip at most, 4k+1 (others are rounded down; 93 -> 24 latents); shorter videos are "
        "kept at their own length (4k+1), in buckets of their own",
    )
    area: str = option(
        format_area(DEFAULT_AREA),
        f"target HxW pixel area, both sides multiples of {MODEL_SIDE_MULTIPLE} (the model's grid); each video "
        "goes to the bucket of that pixel count nearest its aspect: HxW, WxH, or sides on a 64 px grid",
    )
    fps: float | None = option(None, "resample every video to this frame rate (default: keep)")
    clips_per_video: int = option(1, "back-to-back clips taken from each long video")
    captions: str = option("sidecar", CAPTION_SOURCES)
    caption_model: str = option(
        DEFAULT_CAPTION_MODEL, "the Qwen-2.5-VL of --captions qwen: a local dir or hub id"
    )
    conditioning_dir: str | None = option(
        None, "folder of start-frame images named like the videos (default: each clip's first frame)"
    )
    text_embeds: bool = option(True, "store umT5 caption embeddings (t5.safetensors)")
    workers: int = option(help="decoding processes (0: decode inline)", factory=_default_workers)
    batch_size: int = option(1, "clips of one bucket encoded together")
    shard_size: str = option("1GB", "roll to a new shard after this much data, e.g. 200MB")
    device: str | None = option(None, "encoding device (default: cuda:LOCAL_RANK if any, else cpu)")
    dtype: str = option(
        "auto", "encoder dtype: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", choices=ENCODER_DTYPES
    )
    vae_tiling: bool = option(False, "tile the VAE to save memory (slightly changes latents)")
    staging_dir: str | None = option(
        None,
        "local folder for the shard being written and the videos being decoded when the output or the "
        "videos are remote (default: a temporary folder, removed at the end)",
    )
    compile_vae: bool = option(
        True,
        "on CUDA: torch.compile the VAE encoder and let cuDNN pick its fastest convolutions (the first clip "
        "of each bucket waits for the compilation; latents equal within bf16 rounding)",
    )
    rank: int | None = option(None, "this process's slice of the inputs (default: $RANK or 0)")
    world_size: int | None = option(None, "number of slices (default: $WORLD_SIZE or 1)")
    engine: str = option(
        "local",
        "local: decode workers + one encoding process; ray: a Ray Data pipeline on the Ray instance in "
        "$RAY_ADDRESS, else a local one (pip install -e '.[ray]')",
        choices=ENGINES,
    )
    ray_encoders: int = option(1, "--engine ray: encoder actors, one GPU each where the cluster has GPUs")
    simpletuner: str | None = option(
        None,
        "a SimpleTuner multidatabackend.json (or the config.json naming it): prep each video dataset into "
        "OUT_DIR/<id>/ with its own frames, resolution, captions and start frames, and write "
        "OUT_DIR/multidatabackend.json pointing at the shards",
        metavar="FILE",
    )

    def __post_init__(self) -> None:
        if any(side % MODEL_SIDE_MULTIPLE for side in parse_area(self.area)):
            raise ConfigError(
                f"--area {self.area}: both sides must be multiples of {MODEL_SIDE_MULTIPLE} (the model's "
                "pixel grid), e.g. 480x832"
            )
        parse_captions(self.captions)
        parse_size(self.shard_size)
        self._check_inputs()
        self.frames = clip_frames(self.frames, "frames")
        if self.frames < 5:
            raise ConfigError(f"--frames must be at least 5 (one 4k+1 clip), got {self.frames}")
        if self.clips_per_video < 1 or self.batch_size < 1 or self.workers < 0:
            raise ConfigError("--clips-per-video and --batch-size must be >= 1, --workers >= 0")
        if self.conditioning_dir is not None and self.clips_per_video != 1:
            raise ConfigError(
                "--conditioning-dir pairs one start frame with one clip: use --clips-per-video 1"
            )
        if self.ray_encoders < 1:
            raise ConfigError(f"--ray-encoders must be >= 1, got {self.ray_encoders}")
        if self.engine == "ray" and self.resolved_rank[1] > 1:
            raise ConfigError(
                "--engine ray spreads the work over the Ray cluster itself: drop --world-size and "
                "torchrun (or use --engine local for a slice per rank)"
            )
        if self.captions == "qwen" and (is_remote(self.videos_dir) or is_remote(self.out_dir)):
            raise ConfigError(
                "--captions qwen reads local videos and keeps its cache beside local shards: caption a local "
                "copy with `longcat-prep caption --jsonl FILE`, then use --captions jsonl:FILE"
            )
        if self.staging_dir is not None and is_remote(self.staging_dir):
            raise ConfigError(f"--staging-dir must be a local folder, got {self.staging_dir}")
        if self.dtype not in ENCODER_DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(ENCODER_DTYPES)}, got {self.dtype!r}")
        self.resolved_rank  # noqa: B018 (validates rank and world size)

    def _check_inputs(self) -> None:
        """Videos and output folder from the positionals, or datasets from a SimpleTuner file."""
        if self.simpletuner is None:
            if self.videos_dir is None or self.out_dir is None:
                raise ConfigError(
                    "give VIDEOS_DIR and OUT_DIR (or --simpletuner multidatabackend.json --output-dir OUT)"
                )
            return
        if self.videos_dir is not None or self.out_dir is None:
            raise ConfigError(
                "--simpletuner FILE takes each dataset's videos from its instance_data_dir: give only "
                "--output-dir OUT (the shards go to OUT/<dataset id>/)"
            )
        per_dataset = {"frames": DEFAULT_FRAMES, "area": format_area(DEFAULT_AREA), "captions": "sidecar"}
        typed = [f"--{k}" for k, v in per_dataset.items() if getattr(self, k) != v]
        if self.conditioning_dir is not None:
            typed.append("--conditioning-dir")
        if typed:
            raise ConfigError(
                f"{', '.join(typed)}: with --simpletuner each dataset sets its own (video.num_frames, "
                "resolution, caption_strategy, conditioning_data); change them in the file"
            )

    @property
    def resolved_rank(self) -> tuple[int, int]:
        """(rank, world size): the flags, else torchrun's ``RANK`` / ``WORLD_SIZE``, else one process."""
        rank = self.rank if self.rank is not None else int(os.environ.get("RANK", 0))
        world = self.world_size if self.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside world size {world}")
        return rank, world

    def settings(self, dtype: str) -> dict[str, Any]:
        """What shapes the shard contents (``dtype``: the encoders' resolved dtype); resuming with any of
        these changed is refused."""
        return {
            "frames": self.frames,
            "area": list(parse_area(self.area)),
            "fps": self.fps,
            "clips_per_video": self.clips_per_video,
            "captions": self.captions,
            "conditioning_dir": self.conditioning_dir
            and (
                self.conditioning_dir.rstrip("/")
                if is_remote(self.conditioning_dir)
                else str(local_path(self.conditioning_dir).resolve())
            ),
            "text_embeds": self.text_embeds,
            "dtype": dtype,
            "vae_tiling": self.vae_tiling,
        }


@dataclass
class DemoConfig:
    """``longcat-prep demo``: a few generated clips to try the tools on."""

    out_dir: str = option(help="folder to write the demo clips and their captions into", positional=True)


@dataclass
class InspectConfig:
    """``longcat-prep inspect``: counts, buckets and a contact sheet of a shard folder."""

    out_dir: str = option(help="a shard folder written by longcat-prep shard", positional=True)
    sheet: str | None = option(None, "contact sheet path (default: OUT_DIR/contact_sheet.png)")
    max_images: int = option(48, "start frames on the contact sheet")


@dataclass
class MergeConfig:
    """``longcat-prep merge``: one manifest for shards written by several ranks."""

    out_dir: str = option(help="a shard folder written by several ranks", positional=True)


@dataclass
class CaptionConfig:
    """``longcat-prep caption``: Qwen-2.5-VL captions for videos that have none."""

    videos_dir: str = option(help="folder of videos, searched recursively", positional=True)
    model: str = option(DEFAULT_CAPTION_MODEL, "Qwen-2.5-VL checkpoint: a local dir or hub id")
    jsonl: str | None = option(
        None,
        "write captions to this jsonl (file_name + caption; shard reads it with --captions jsonl:FILE) "
        "instead of a VIDEO.txt beside each video",
    )
    overwrite: bool = option(False, "caption videos that already have a caption too")
    prompt_template: str | None = option(
        None,
        "the instruction given to the model, or @FILE to read it from a file "
        "(default: one motion-centric paragraph: subject, action, camera, scene, style)",
    )
    fps: float = option(2.0, "frames per second shown to the model")
    max_frames: int = option(16, "frames per video at most; longer videos are sampled sparser")
    max_pixels: int = option(360 * 640, "pixels per frame at most (frames are shrunk to fit)")
    batch_size: int = option(4, "videos captioned together")
    max_new_tokens: int = option(256, "caption length limit in tokens")
    device: str | None = option(None, "default: cuda if available, else cpu (bf16 on GPU)")

    def __post_init__(self) -> None:
        if is_remote(self.videos_dir):
            raise ConfigError(
                f"longcat-prep caption writes captions beside local videos; copy {self.videos_dir} to a local "
                "folder first (longcat-prep shard reads captions from the bucket)"
            )
        if self.fps <= 0 or self.max_frames < 1 or self.max_pixels < 1 or self.batch_size < 1:
            raise ConfigError("--fps must be > 0; --max-frames, --max-pixels and --batch-size >= 1")


@dataclass
class PushConfig:
    """``longcat-prep push``: a finished shard folder to a Hugging Face dataset repo."""

    out_dir: str = option(help="a finished shard folder (its manifest.json says complete)", positional=True)
    repo_id: str = option(
        help="the dataset repo to push to, user/name; created when missing", positional=True
    )
    private: bool = option(False, "create the repo private")
    license: str = option("other", "license id for the card, e.g. cc-by-4.0: the one your clips allow")
    dry_run: bool = option(False, "write the card (OUT_DIR/README.md) and upload nothing")
