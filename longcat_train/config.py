"""The config of ``longcat-train`` (``TrainConfig``); ``longcat-sample``'s is ``sample_config.SampleConfig``.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_data.buckets import clip_frames
from longcat_data.defaults import (
    DEFAULT_AREA,
    DEFAULT_COND_FRAMES,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_MODEL,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    DISTILL_GUIDANCE,
    DISTILL_STEPS,
    default_area,
    default_frames,
)
from longcat_data.flags import (
    NOT_EMPTY,
    Check,
    ConfigError,
    at_least,
    config_errors,
    format_area,
    number,
    option,
    parse_area,
)
from longcat_train.architecture import ATTENTION_BACKENDS, BLOCK_LINEARS, CHECKPOINT_MODES
from longcat_train.checks import (
    AREA_ON_GRID,
    CLIP_FRAMES,
    COND_FRAMES,
    CREATABLE_FOLDER,
    RESUME_FROM,
    SEED,
    VALIDATION_SOURCE,
)
from longcat_train.conditioning import (
    CONDITIONING_MIX,
    CONDITIONINGS,
    DEFAULT_MIX,
    VALIDATION_CONDITIONINGS,
    task_weights,
)
from longcat_train.lora_spec import LORA_SPEC, LORA_SPECS
from longcat_train.video_settings import RefineSettings, VideoSettings

__all__ = ["ConfigError", "RefineSettings", "TrainConfig", "VideoSettings", "save_config"]

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = BLOCK_LINEARS
BASE_PRECISIONS = ("no_change", "bf16", "int8-quanto", "fp8-torchao")


def _memory_budget(value: str | None) -> bool:
    if value is None or value == "auto":
        return True
    try:
        return 0 < float(value) < float("inf")
    except ValueError:
        return False


MEMORY_BUDGET = Check(_memory_budget, "a number of GB (e.g. 24) or auto")
# The value of gradient_checkpointing left to the device (compile and fp8_matmuls: None), resolved by
# planning.resolve_auto before a run builds its model.
AUTO = "auto"


@dataclass
class TrainConfig:
    # -- model and data
    model: str = option(
        DEFAULT_MODEL,
        "'tiny', an official checkpoint directory, or a hub id",
        simpletuner="pretrained_model_name_or_path",
        check=NOT_EMPTY,
    )
    shards: list[str] = option(
        [], "shard spec(s): directory, brace pattern, pipe:cmd, hf://datasets/user/name, s3://bucket/shards"
    )
    frames: int | None = option(
        None,
        f"video frames per clip (4k+1; others are rounded down); default: what the shards were made with "
        f"(their manifest.json), else {DEFAULT_FRAMES} ({default_frames('tiny')} for tiny); a count the shards do not hold is refused",
        check=CLIP_FRAMES,
    )
    conditioning: str = option(
        "i2v",
        "what each clip is conditioned on: i2v (the start frame), t2v (nothing), continuation (its "
        "first --cond-frames frames), mixed (a task drawn per clip with --conditioning-mix)",
        choices=CONDITIONINGS,
        switch=("i2v", "i2v", "t2v"),
    )
    cond_frames: int = option(
        DEFAULT_COND_FRAMES,
        "continuation: clean leading frames of each clip (4k+1; 13 -> 4 latent frames), fewer than frames",
        check=COND_FRAMES,
    )
    conditioning_mix: str = option(
        DEFAULT_MIX,
        "mixed: TASK=WEIGHT,... over i2v, continuation, t2v (weights normalised; 0 or left out: never)",
        check=CONDITIONING_MIX,
    )
    output_dir: str = option(
        "output",
        "where checkpoints, the LoRA, logs and validation videos go",
        simpletuner="output_dir",
        check=CREATABLE_FOLDER,
    )
    seed: int = option(
        0,
        "seed for LoRA init, noise, sigmas, caption dropout and the data order",
        simpletuner="seed",
        check=SEED,
    )
    # -- LoRA
    lora_rank: int = option(8, "LoRA rank", simpletuner="lora_rank", check=at_least(1))
    lora_alpha: float = option(
        0.0,
        "LoRA alpha (scale = alpha / rank); 0 means alpha = rank",
        simpletuner="lora_alpha",
        check=number(0),
    )
    lora_dropout: float = option(
        0.0, "dropout on the LoRA input", simpletuner="lora_dropout", check=number(0, 1, high_open=True)
    )
    lora_targets: list[str] = option(
        list(DEFAULT_LORA_TARGETS), "module-name suffixes of the DiT linears that get LoRA", check=NOT_EMPTY
    )
    base_lora: list[str] = option(
        [],
        "PATH[:STRENGTH] of a LoRA merged into the frozen base before training (e.g. the distill LoRA); "
        "repeat for several; sample with it and the trained LoRA together",
        repeat=True,
        check=LORA_SPECS,
    )
    # -- optimisation
    learning_rate: float = option(
        1e-4, "peak learning rate", simpletuner="learning_rate", check=number(0, low_open=True)
    )
    optimizer: str = option(
        "adamw", "adamw (torch, fused on CUDA) or adamw8bit (bitsandbytes)", choices=("adamw", "adamw8bit")
    )
    adam_beta1: float = option(
        0.9, "AdamW beta1", simpletuner="adam_beta1", check=number(0, 1, high_open=True)
    )
    adam_beta2: float = option(
        0.999, "AdamW beta2", simpletuner="adam_beta2", check=number(0, 1, high_open=True)
    )
    adam_epsilon: float = option(
        1e-8, "AdamW epsilon", simpletuner="adam_epsilon", check=number(0, low_open=True)
    )
    weight_decay: float = option(
        0.01, "AdamW decoupled weight decay", simpletuner="adam_weight_decay", check=number(0)
    )
    lr_scheduler: str = option(
        "constant",
        "constant or cosine (to 0 at max_train_steps), after linear warmup",
        choices=("constant", "cosine"),
    )
    lr_warmup_steps: int = option(
        0, "linear warmup steps from 0 to learning_rate", simpletuner="lr_warmup_steps", check=at_least(0)
    )
    max_train_steps: int = option(
        1000,
        "optimizer steps to train; 0 derives it from num_train_epochs",
        simpletuner="max_train_steps",
        check=at_least(0),
    )
    num_train_epochs: float = option(
        0.0,
        "epochs (of epoch_samples samples) when max_train_steps is 0",
        simpletuner="num_train_epochs",
        check=number(0),
    )
    train_batch_size: int = option(
        1, "clips per batch per GPU (one bucket per batch)", simpletuner="train_batch_size", check=at_least(1)
    )
    gradient_accumulation_steps: int = option(
        1, "batches per optimizer step", simpletuner="gradient_accumulation_steps", check=at_least(1)
    )
    max_grad_norm: float = option(
        1.0,
        "clip the gradient norm to this; 0 turns clipping off",
        simpletuner="max_grad_norm",
        check=number(0),
    )
    # -- flow matching
    flow_schedule_shift: float = option(
        DEFAULT_SHIFT,
        "sigma shift s' = shift*s/(1+(shift-1)*s); 12 for 480p",
        simpletuner="flow_schedule_shift",
        check=number(0, low_open=True),
    )
    sigma_sampling: str = option(
        "logit_normal", "training sigma distribution", choices=("logit_normal", "uniform")
    )
    logit_mean: float = option(0.0, "mean of the logit-normal sigma distribution", check=number())
    logit_std: float = option(
        1.0, "std of the logit-normal sigma distribution", check=number(0, low_open=True)
    )
    caption_dropout: float = option(
        0.0,
        "probability of training a clip on the empty prompt (for CFG)",
        simpletuner="caption_dropout_probability",
        check=number(0, 1),
    )
    # -- memory and speed
    gradient_checkpointing: str = option(
        AUTO,
        "selective (keep attention outputs, recompute the rest), full (recompute everything), elementwise "
        "(keep every matmul and attention output, recompute only the elementwise work: fast compiled, "
        "half of none's memory), none, or auto: on CUDA checkpointing planned per block under the GPU's "
        "memory (what --memory-budget auto does), elsewhere (or with --fsdp) selective",
        choices=(AUTO, *CHECKPOINT_MODES),
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
    compile: bool | None = option(
        None,
        "torch.compile each DiT block step: fuses the fp32 elementwise work (not with block swap); "
        "default auto: on CUDA where Triton can build kernels, without block swap, activation offload or "
        "fsdp, when the run's steps save more time than compiling takes (predicted by the memory plan's "
        "cost model), else off",
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
        check=at_least(1),
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
        check=at_least(0),
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
    fp8_matmuls: bool | None = option(
        None,
        "float8 matmuls for the frozen base linears, weights kept in bf16 (GPUs with compute capability "
        "8.9+: Ada, Hopper); faster steps, LoRA gradients as close to float32 as bf16's; default auto: "
        "on with compile on such a GPU for a bf16 run with an unquantised base, else off",
    )
    memory_budget: str | None = option(
        None,
        "GB of GPU memory a step may use, or auto (the GPU's): checkpointing is then chosen per block so "
        "that the step fits and recomputes least (the other flags as given; see --plan)",
        metavar="GB|auto",
        check=MEMORY_BUDGET,
    )
    plan: bool = option(
        False,
        "print the predicted peak memory and step time of these flags and the fastest flags that fit "
        "(--gpu-memory, else this GPU), as a command line; loads no weights, trains nothing",
        group="memory plan",
    )
    gpu_memory: float | None = option(
        None,
        "with --plan: plan for a GPU of this many GB instead of this machine's",
        metavar="GB",
        check=number(0, low_open=True),
        group="memory plan",
    )
    area: str = option(
        format_area(DEFAULT_AREA),
        "HxW of the clips --plan plans for (--memory-budget takes the largest bucket the manifest lists)",
        check=AREA_ON_GRID,
        group="memory plan",
    )
    # -- data loading
    num_workers: int = option(
        2,
        "DataLoader worker processes per GPU (part of the data order)",
        simpletuner="dataloader_num_workers",
        check=at_least(0),
    )
    shuffle_buffer: int = option(64, "samples each worker holds for shuffling", check=at_least(1))
    resampled: bool = option(False, "draw shards with replacement forever instead of shuffled passes")
    allow_missing_shards: bool = option(
        False, "train on the shards that exist when the manifest lists some that are missing (a warning)"
    )
    epoch_samples: int = option(
        0, "samples per epoch for logging and num_train_epochs; 0 reads the manifest", check=at_least(0)
    )
    pin_memory: bool = option(True, "pinned host memory for batches (CUDA only)")
    # -- checkpoints
    checkpointing_steps: int = option(
        500,
        "save a resumable checkpoint every N steps (0: only at the end)",
        simpletuner="checkpointing_steps",
        check=at_least(0),
    )
    checkpoints_total_limit: int = option(
        3,
        "keep the newest N checkpoints (0 keeps all)",
        simpletuner="checkpoints_total_limit",
        check=at_least(0),
    )
    overwrite: bool = option(
        False,
        "start over in an output_dir that holds a run: delete its checkpoints, validation, tensorboard, "
        "metrics, LoRA and config files first (nothing else)",
    )
    resume: str | None = option(
        None,
        "'latest' (in output_dir, the value of a bare --resume) or a checkpoint/output directory to resume from",
        const="latest",
        metavar="DIR",
        simpletuner="resume_from_checkpoint",
        check=RESUME_FROM,
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
        None,
        "eval shards or a folder of images (or videos) + .txt captions; unset: no validation",
        check=VALIDATION_SOURCE,
    )
    validation_every: int = option(
        0, "validate every N steps (0: only at the end)", simpletuner="validation_steps", check=at_least(0)
    )
    validation_limit: int = option(2, "validation pairs to sample", check=at_least(1))
    validation_frames: int | None = option(
        None,
        "frames of each validation video (4k+1; others are rounded down); default: frames",
        simpletuner="validation_num_video_frames",
        check=CLIP_FRAMES,
    )
    validation_inference_steps: int = option(
        DEFAULT_STEPS, "sampler steps", simpletuner="validation_num_inference_steps", check=at_least(1)
    )
    validation_guidance: float = option(
        DEFAULT_GUIDANCE,
        "classifier-free guidance (CFG-Zero*)",
        simpletuner="validation_guidance",
        check=number(0),
    )
    validation_area: str | None = option(
        None,
        f"HxW area the start images are fitted to (their nearest bucket); default: the shards' --area "
        f"(their manifest.json), else {format_area(DEFAULT_AREA)} ({format_area(default_area('tiny'))} for tiny)",
        aliases=("--validation-resolution", "--validation_resolution"),
        simpletuner="validation_resolution",
        check=AREA_ON_GRID,
    )
    validation_seed: int = option(0, "sampler seed", simpletuner="validation_seed", check=SEED)
    validation_conditioning: str = option(
        "auto",
        "what validation samples: i2v (from the start image), continuation (of the validation clip's "
        "first --cond-frames frames: eval shards or a folder of videos + .txt); auto: continuation "
        "when --conditioning continuation, else i2v",
        choices=VALIDATION_CONDITIONINGS,
    )
    validation_lora: list[str] = option(
        [],
        "PATH[:STRENGTH] of a LoRA validation samples with besides the one training; repeat for several",
        repeat=True,
        check=LORA_SPECS,
    )

    validation_distill_lora: str | None = option(
        None,
        "the distill LoRA (the official checkpoint's lora/cfg_step_lora.safetensors): validation samples "
        f"with it on and the distilled schedule, {DISTILL_STEPS} steps without guidance unless "
        "--validation-inference-steps / --validation-guidance say otherwise",
        check=LORA_SPEC,
    )

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):
            # SimpleTuner and TOML say true/false: true keeps attention outputs where memory allows.
            self.gradient_checkpointing = "selective" if self.gradient_checkpointing else "none"
        self.frames = clip_frames(self.frames, "frames")
        self.validation_frames = clip_frames(self.validation_frames, "validation_frames")
        # A file may name one shard spec, target or LoRA as a plain string.
        for name in ("shards", "lora_targets", "base_lora", "validation_lora"):
            value = getattr(self, name)
            if isinstance(value, str | tuple):
                setattr(self, name, [value] if isinstance(value, str) else list(value))

    def validate(self) -> None:
        """ConfigError with one line per value no run can use: each field's type, choices and declared
        check (``flags.config_errors``), then the rules between fields (``VALUE_RULES``). Settings that
        do not combine are ``longcat_train.techniques.check_techniques``'s to refuse."""
        errors = config_errors(self) or [
            message.format(**self.to_dict()) for clashes, message in VALUE_RULES if clashes(self)
        ]
        if errors:
            raise ConfigError("\n".join(errors))

    @property
    def alpha(self) -> float:
        return self.lora_alpha or float(self.lora_rank)

    def take_shard_settings(self, manifest: dict | None) -> None:
        """Fill ``frames``, ``validation_frames`` and ``validation_area`` left unset from what the shards
        were made with (their manifest; ``None``: remote shards without one), else the model's defaults.
        Set values stay: the trainer's manifest check refuses a ``frames`` the shards do not hold."""
        from longcat_data.manifest import made_frames  # torch, through the shard schema: not at --help

        settings = (manifest or {}).get("settings", {})
        if self.frames is None:
            made = made_frames(manifest) if manifest else None
            self.frames = made or default_frames(self.model)
            log.info("frames = %d (%s)", self.frames, "the shards'" if made else "the default")
        if self.validation_frames is None:
            self.validation_frames = self.frames
        if self.validation_area is None:
            area = settings.get("area")
            self.validation_area = format_area(area or default_area(self.model))

    def total_steps(self, epoch_samples: int, world_size: int = 1) -> int:
        """The optimizer steps the run trains: ``max_train_steps``, else ``num_train_epochs`` of
        ``epoch_samples`` (0 when the sample count is not known)."""
        per_step = self.train_batch_size * self.gradient_accumulation_steps * world_size
        return self.max_train_steps or math.ceil(self.num_train_epochs * epoch_samples / per_step)

    @property
    def i2v(self) -> bool:
        """Every clip trains image-to-video (``--i2v``, the default)."""
        return self.conditioning == "i2v"

    @property
    def tasks(self) -> dict[str, float]:
        """The tasks this run trains -> their weights (> 0)."""
        return task_weights(self.conditioning, self.conditioning_mix)

    @property
    def validation_task(self) -> str:
        """The task validation samples: ``validation_conditioning``, where ``auto`` follows a
        continuation run and is i2v otherwise."""
        if self.validation_conditioning != "auto":
            return self.validation_conditioning
        return "continuation" if self.conditioning == "continuation" else "i2v"

    @property
    def validation_settings(self) -> VideoSettings:
        """The settings every validation video is sampled with (after ``take_shard_settings``); with
        ``validation_distill_lora`` the distilled schedule, and its steps and guidance where the run keeps
        the plain defaults."""
        distill = self.validation_distill_lora is not None
        steps, guidance = self.validation_inference_steps, self.validation_guidance
        if distill and steps == DEFAULT_STEPS:
            steps = DISTILL_STEPS
        if distill and guidance == DEFAULT_GUIDANCE:
            guidance = DISTILL_GUIDANCE
        return VideoSettings(
            frames=self.validation_frames or self.frames or default_frames(self.model),
            steps=steps,
            guidance=guidance,
            shift=self.flow_schedule_shift,
            seed=self.validation_seed,
            area=parse_area(self.validation_area or default_area(self.model)),
            distill=distill,
        )

    @property
    def validation_loras(self) -> list[str]:
        """PATH[:STRENGTH] of every frozen LoRA validation samples with (the distill LoRA last)."""
        return self.validation_lora + ([self.validation_distill_lora] if self.validation_distill_lora else [])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Values of several fields that no run can use together: (test, the message naming the fix).
VALUE_RULES: tuple[tuple[Callable[[TrainConfig], bool], str], ...] = (
    (
        lambda c: c.max_train_steps == 0 and c.num_train_epochs <= 0,
        "max_train_steps = 0: must come with num_train_epochs > 0 (set one of them)",
    ),
    (
        lambda c: c.overwrite and c.resume is not None,
        "overwrite and resume exclude each other: resume continues the run in output_dir, overwrite "
        "deletes it; drop one",
    ),
    (
        lambda c: "continuation" in c.tasks and c.frames is not None and c.cond_frames >= c.frames,
        "cond_frames = {cond_frames}: continuation needs fewer than frames = {frames} (at least one latent "
        "frame to train); lower cond_frames",
    ),
    (
        lambda c: (
            c.validation_source is not None
            and c.validation_task == "continuation"
            and c.cond_frames >= c.validation_frames
        ),
        "cond_frames = {cond_frames}: a continuation validation needs fewer than validation_frames = "
        "{validation_frames}; raise validation_frames or lower cond_frames",
    ),
)

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
