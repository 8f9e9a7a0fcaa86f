"""The configs of ``longcat-train`` (``TrainConfig``) and ``longcat-sample`` (``SampleConfig``).

Each field is a flag (``longcat_data.flags``): ``--lora-rank 16`` or ``--lora_rank 16``, booleans as
``--flag`` / ``--no-flag``. ``TrainConfig`` is also filled from TOML/JSON files with the same keys and
from SimpleTuner configs (``longcat_train.simpletuner``, from the fields' ``simpletuner`` keys);
precedence: field defaults < config file < typed flags (``longcat_train.cli``). This module imports no
torch or model library, so parsing flags and ``--help`` stay instant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_data.buckets import MIN_FRAMES, MODEL_SIDE_MULTIPLE
from longcat_data.defaults import (
    DEFAULT_AREA,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_MODEL,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    default_area,
    default_frames,
)
from longcat_data.flags import (
    ConfigError,
    canonical_keys,
    check_choices,
    format_area,
    option,
    parse_area,
)
from longcat_train.architecture import ATTENTION_BACKENDS, BLOCK_LINEARS, CHECKPOINT_MODES

__all__ = ["ConfigError", "SampleConfig", "TrainConfig", "VideoSettings", "save_config"]

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = BLOCK_LINEARS
BASE_PRECISIONS = ("no_change", "bf16", "int8-quanto", "fp8-torchao")


@dataclass(frozen=True)
class VideoSettings:
    """What a sampled video depends on besides the model, the start image and the prompt: its length,
    the Euler steps, the guidance scale, the sigma shift, the noise seed and the bucket area the start
    image is fitted to. The same settings and inputs make the same frames."""

    frames: int = DEFAULT_FRAMES
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    shift: float = DEFAULT_SHIFT
    seed: int = 0
    area: tuple[int, int] = DEFAULT_AREA


@dataclass
class TrainConfig:
    # -- model and data
    model: str = option(
        DEFAULT_MODEL,
        "'tiny', an official checkpoint directory, or a hub id",
        simpletuner="pretrained_model_name_or_path",
    )
    shards: list[str] = option(
        [], "shard spec(s): directory, brace pattern, pipe:cmd, hf://datasets/user/name"
    )
    frames: int = option(
        DEFAULT_FRAMES, "video frames per clip (4k+1); the shards must have been made with this count"
    )
    i2v: bool = option(
        True, "image-to-video: latent frame 0 is the clean start frame; --no-i2v trains text-to-video"
    )
    output_dir: str = option(
        "output", "where checkpoints, the LoRA, logs and validation videos go", simpletuner="output_dir"
    )
    seed: int = option(
        0, "seed for LoRA init, noise, sigmas, caption dropout and the data order", simpletuner="seed"
    )
    # -- LoRA
    lora_rank: int = option(8, "LoRA rank", simpletuner="lora_rank")
    lora_alpha: float = option(
        0.0, "LoRA alpha (scale = alpha / rank); 0 means alpha = rank", simpletuner="lora_alpha"
    )
    lora_dropout: float = option(0.0, "dropout on the LoRA input", simpletuner="lora_dropout")
    lora_targets: list[str] = option(
        list(DEFAULT_LORA_TARGETS), "module-name suffixes of the DiT linears that get LoRA"
    )
    # -- optimisation
    learning_rate: float = option(1e-4, "peak learning rate", simpletuner="learning_rate")
    optimizer: str = option(
        "adamw", "adamw (torch, fused on CUDA) or adamw8bit (bitsandbytes)", choices=("adamw", "adamw8bit")
    )
    adam_beta1: float = option(0.9, "AdamW beta1", simpletuner="adam_beta1")
    adam_beta2: float = option(0.999, "AdamW beta2", simpletuner="adam_beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon", simpletuner="adam_epsilon")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay", simpletuner="adam_weight_decay")
    lr_scheduler: str = option(
        "constant",
        "constant or cosine (to 0 at max_train_steps), after linear warmup",
        choices=("constant", "cosine"),
    )
    lr_warmup_steps: int = option(
        0, "linear warmup steps from 0 to learning_rate", simpletuner="lr_warmup_steps"
    )
    max_train_steps: int = option(
        1000, "optimizer steps to train; 0 derives it from num_train_epochs", simpletuner="max_train_steps"
    )
    num_train_epochs: float = option(
        0.0, "epochs (of epoch_samples samples) when max_train_steps is 0", simpletuner="num_train_epochs"
    )
    train_batch_size: int = option(
        1, "clips per batch per GPU (one bucket per batch)", simpletuner="train_batch_size"
    )
    gradient_accumulation_steps: int = option(
        1, "batches per optimizer step", simpletuner="gradient_accumulation_steps"
    )
    max_grad_norm: float = option(
        1.0, "clip the gradient norm to this; 0 turns clipping off", simpletuner="max_grad_norm"
    )
    # -- flow matching
    flow_schedule_shift: float = option(
        DEFAULT_SHIFT,
        "sigma shift s' = shift*s/(1+(shift-1)*s); 12 for 480p",
        simpletuner="flow_schedule_shift",
    )
    sigma_sampling: str = option(
        "logit_normal", "training sigma distribution", choices=("logit_normal", "uniform")
    )
    logit_mean: float = option(0.0, "mean of the logit-normal sigma distribution")
    logit_std: float = option(1.0, "std of the logit-normal sigma distribution")
    caption_dropout: float = option(
        0.0,
        "probability of training a clip on the empty prompt (for CFG)",
        simpletuner="caption_dropout_probability",
    )
    # -- memory and speed
    gradient_checkpointing: str = option(
        "selective",
        "selective (keep attention outputs), full, or none",
        choices=CHECKPOINT_MODES,
        simpletuner="gradient_checkpointing",
    )
    mixed_precision: str = option(
        "bf16",
        "bf16 base weights + autocast on CUDA; the CPU always runs fp32",
        choices=("bf16", "fp32"),
        simpletuner="mixed_precision",
    )
    attention: str = option(
        "sdpa",
        "DiT attention kernel: sdpa, xformers or block_sparse (ours)",
        choices=ATTENTION_BACKENDS,
        aliases=("--attention-implementation", "--attention_implementation"),
        simpletuner="attention_implementation",
    )
    compile: bool = option(
        False, "torch.compile each DiT block step: fuses the fp32 elementwise work (not with block swap)"
    )
    compile_tune: bool = option(
        False,
        "with compile: also tune the fused kernels' launch settings (coordinate descent): minutes more "
        "compilation the first time (then cached) for slightly faster steps",
    )
    feed_forward_chunks: int = option(
        1,
        "run each block's feed-forward in this many latent-frame groups in training: lower peak memory "
        "(24 GB cards: 4) for one more feed-forward pass",
    )
    fsdp: bool = option(
        False, "shard the base model over GPUs with FSDP2 (per block) instead of replicating it"
    )
    block_swap: int = option(
        0,
        "DiT blocks kept on block_swap_device and streamed in one block ahead (GPUs smaller than the model)",
        aliases=("--musubi-blocks-to-swap", "--musubi_blocks_to_swap"),
        simpletuner="musubi_blocks_to_swap",
        metavar="N",
    )
    block_swap_device: str = option(
        "cpu", "where swapped blocks live", simpletuner="musubi_block_swap_device"
    )
    offload_activations: bool = option(
        False,
        "keep what autograd saves for backward (with checkpointing: each block's input) in pinned host "
        "memory, copied on a side stream; for 24 GB cards",
    )
    base_model_precision: str = option(
        "no_change",
        'store the frozen base quantised: int8-quanto or fp8-torchao (pip install -e ".[quant]")',
        choices=BASE_PRECISIONS,
        simpletuner="base_model_precision",
    )
    fp8_matmuls: bool = option(
        False,
        "float8 matmuls for the frozen base linears, weights kept in bf16 (GPUs with compute capability "
        "8.9+: Ada, Hopper); faster steps, LoRA gradients as close to float32 as bf16's",
    )
    # -- data loading
    num_workers: int = option(
        2,
        "DataLoader worker processes per GPU (part of the data order)",
        simpletuner="dataloader_num_workers",
    )
    shuffle_buffer: int = option(64, "samples each worker holds for shuffling")
    resampled: bool = option(False, "draw shards with replacement forever instead of shuffled passes")
    epoch_samples: int = option(0, "samples per epoch for logging and num_train_epochs; 0 reads the manifest")
    pin_memory: bool = option(True, "pinned host memory for batches (CUDA only)")
    # -- checkpoints
    checkpointing_steps: int = option(
        500,
        "save a resumable checkpoint every N steps (0: only at the end)",
        simpletuner="checkpointing_steps",
    )
    checkpoints_total_limit: int = option(
        3, "keep the newest N checkpoints (0 keeps all)", simpletuner="checkpoints_total_limit"
    )
    resume: str | None = option(
        None,
        "'latest' (in output_dir, the value of a bare --resume) or a checkpoint/output directory to resume from",
        const="latest",
        metavar="DIR",
        simpletuner="resume_from_checkpoint",
    )
    # -- logging
    report_to: str = option(
        "tensorboard",
        "tensorboard, wandb (plus tensorboard) or none",
        choices=("tensorboard", "wandb", "none"),
    )
    wandb_project: str = option(
        "longcat", "wandb project when report_to = wandb", simpletuner="tracker_project_name"
    )
    progress: bool = option(True, "show a progress bar")
    # -- validation
    validation_source: str | None = option(
        None, "eval shards or a folder of image + .txt pairs; unset: no validation"
    )
    validation_every: int = option(
        0, "validate every N steps (0: only at the end)", simpletuner="validation_steps"
    )
    validation_limit: int = option(2, "validation pairs to sample")
    validation_frames: int = option(
        DEFAULT_FRAMES, "frames of each validation video", simpletuner="validation_num_video_frames"
    )
    validation_inference_steps: int = option(
        DEFAULT_STEPS, "sampler steps", simpletuner="validation_num_inference_steps"
    )
    validation_guidance: float = option(
        DEFAULT_GUIDANCE, "classifier-free guidance (CFG-Zero*)", simpletuner="validation_guidance"
    )
    validation_area: str = option(
        format_area(DEFAULT_AREA),
        "HxW area the start images are fitted to (their nearest bucket)",
        aliases=("--validation-resolution", "--validation_resolution"),
        simpletuner="validation_resolution",
    )
    validation_seed: int = option(0, "sampler seed", simpletuner="validation_seed")

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):
            # SimpleTuner and TOML say true/false: true keeps attention outputs where memory allows.
            self.gradient_checkpointing = "selective" if self.gradient_checkpointing else "none"
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        self.lora_targets = list(self.lora_targets)

    def validate(self) -> None:
        """Raise ConfigError for values no run can use. Settings that do not combine are
        ``longcat_train.techniques.check_techniques``'s to refuse."""
        check_choices(self)
        parse_area(self.validation_area)
        if (self.frames - 1) % 4 or self.frames < 5:
            raise ConfigError(
                f"frames = {self.frames}: must be 4k+1 and at least 5 (the VAE's 4x time stride)"
            )
        if self.feed_forward_chunks < 1:
            raise ConfigError(
                f"feed_forward_chunks = {self.feed_forward_chunks}: must be at least 1 (1: no chunking)"
            )
        if self.block_swap < 0:
            raise ConfigError(f"block_swap = {self.block_swap}: must be 0 (off) or more")
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank = {self.lora_rank}: must be at least 1")
        if not self.lora_targets:
            raise ConfigError("lora_targets is empty: name at least one DiT linear (e.g. attn.qkv)")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("train_batch_size and gradient_accumulation_steps must be at least 1")
        if self.max_train_steps < 0 or (self.max_train_steps == 0 and self.num_train_epochs <= 0):
            raise ConfigError("set max_train_steps > 0, or max_train_steps = 0 with num_train_epochs > 0")
        if not 0 <= self.caption_dropout <= 1:
            raise ConfigError(f"caption_dropout = {self.caption_dropout}: a probability in [0, 1]")

    @property
    def alpha(self) -> float:
        return self.lora_alpha or float(self.lora_rank)

    @property
    def validation_settings(self) -> VideoSettings:
        """The settings every validation video is sampled with."""
        return VideoSettings(
            frames=self.validation_frames,
            steps=self.validation_inference_steps,
            guidance=self.validation_guidance,
            shift=self.flow_schedule_shift,
            seed=self.validation_seed,
            area=parse_area(self.validation_area),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that may change between a run and its resume: where things go and how often things happen, not
# what the model sees. Everything else must match the checkpoint.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "resume",
        "max_train_steps",
        "num_train_epochs",
        "checkpointing_steps",
        "checkpoints_total_limit",
    }
    | {"report_to", "wandb_project", "progress", "pin_memory"}
    | {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("validation_")}
)


def resume_mismatch(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """``key: saved -> current`` for every key that differs and would change the training trajectory.

    ``saved`` may come from an older version that named some keys differently (their aliases today)."""
    saved = canonical_keys(TrainConfig, saved)
    now = current.to_dict()
    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in RESUMABLE_CHANGES and _normal(saved.get(k)) != _normal(now.get(k))
    ]


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- files


def choices_of(name: str) -> tuple[str, ...]:
    """The declared choices of the TrainConfig field ``name``."""
    return next(f.metadata["choices"] for f in dataclasses.fields(TrainConfig) if f.name == name)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- the longcat-sample command

# What one video may ask for, on the command line and on the preview page alike (inclusive): past these a
# value is a typo, or a run that fails (out of memory, a seed that overflows) after the models loaded.
SAMPLE_LIMITS: dict[str, tuple[float, float]] = {
    "frames": (MIN_FRAMES, 257),
    "steps": (1, 200),
    "guidance": (0.0, 20.0),
    "lora_strength": (-4.0, 4.0),
    "seed": (0, 2**63 - 1),
    "fps": (1, 240),
    "port": (0, 65535),
}


@dataclass
class SampleConfig:
    """What ``longcat-sample`` does; one field per flag. ``None`` sizes mean the model's defaults."""

    model: str = option(DEFAULT_MODEL, "'tiny', a checkpoint directory or a hub id")
    image: str | None = option(
        None, "start frame (PNG, JPEG or WebP); resized and cropped to the nearest bucket"
    )
    prompts: list[str] = option(
        [],
        "what happens in the video; repeat for several videos of the same start frame (seeds seed, seed+1, ...)",
        flag="--prompt",
        repeat=True,
    )
    negative_prompt: str = option("", "the unconditional prompt of guidance (empty, as upstream)")
    output: str = option("out.mp4", "MP4 path (several prompts: out_0.mp4, ...)", aliases=("-o",))
    lora: list[str] = option(
        [],
        "LoRA safetensors, ours or the official format; with --serve, repeat to offer several on the page",
        repeat=True,
    )
    lora_strength: float = option(1.0, "LoRA multiplier")
    frames: int | None = option(
        None, f"4k+1 frames (others are rounded); default {DEFAULT_FRAMES}, {default_frames('tiny')} for tiny"
    )
    steps: int = option(DEFAULT_STEPS, "Euler steps")
    guidance: float = option(DEFAULT_GUIDANCE, "CFG-Zero* scale; 1 = off")
    shift: float = option(DEFAULT_SHIFT, "sigma shift (12 at 480p)")
    seed: int = option(0, "noise seed (prompt i uses seed + i)")
    area: tuple[int, int] | None = option(
        None,
        f"bucket area HxW; the start image's shape picks the bucket (default {format_area(DEFAULT_AREA)}, "
        f"{format_area(default_area('tiny'))} for tiny)",
        parse=parse_area,
        aliases=("--size",),
    )
    fps: int = option(DEFAULT_FPS, "frame rate of the MP4")
    gif: bool = option(False, "also write a small GIF preview beside the MP4")
    save_frames: bool = option(False, "also write every frame as PNG into out/")
    vae_tiling: bool = option(False, "decode in spatial tiles: less memory, a bit slower")
    block_swap: int = option(
        0,
        "keep the last N DiT blocks in host memory and stream them in (GPUs smaller than the model)",
        metavar="N",
    )
    attention: str = option(
        "sdpa",
        "DiT self-attention: sdpa (dense, as the model was trained) or block_sparse (our kernel at 1/16 "
        "density: faster, a different computation; judge by eye)",
        choices=ATTENTION_BACKENDS,
        aliases=("--attention-implementation", "--attention_implementation"),
    )
    device: str | None = option(None, "default: cuda if available, else cpu")
    serve: bool = option(False, "serve the preview page instead of sampling once", group="preview page")
    host: str = option("127.0.0.1", "address the page listens on", group="preview page")
    port: int = option(7860, "port the page listens on", group="preview page")
    serve_dir: str = option("longcat_previews", "where the page's videos are written", group="preview page")
    max_upload_mb: float = option(20.0, "largest start image the page accepts", group="preview page")

    def __post_init__(self) -> None:
        # The tiny model is for trying the tools on a CPU: its defaults are the demo clips' small size.
        if self.area is None:
            self.area = default_area(self.model)
        self.area = parse_area(self.area)
        if self.frames is None:
            self.frames = default_frames(self.model)

    def validate(self) -> None:
        """Raise ConfigError, naming the flag, for values no video can use; files are the sampler's to check."""
        check_choices(self)
        for name, (low, high) in SAMPLE_LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:  # NaN fails too
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be between {low} and {high}")
        for name in ("shift", "max_upload_mb"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be a positive number")
        if self.block_swap < 0:
            raise ConfigError(f"--block-swap {self.block_swap}: must be 0 (off) or more")
        if any(side % MODEL_SIDE_MULTIPLE for side in self.area):
            raise ConfigError(
                f"--area {format_area(self.area)}: both sides must be multiples of {MODEL_SIDE_MULTIPLE}, "
                "e.g. 480x832"
            )
        for flag, text in [("--prompt", p) for p in self.prompts] + [
            ("--negative-prompt", self.negative_prompt)
        ]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(
                    f"{flag} holds bytes that are not UTF-8 text; set a UTF-8 locale or type it again"
                ) from None

    @property
    def video_settings(self) -> VideoSettings:
        """The settings of the videos this config asks for (video i of several prompts: seed + i): the
        flags of the same names."""
        return VideoSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VideoSettings)})
