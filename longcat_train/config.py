"""Command configurations: `longcat-train`'s ``TrainConfig`` (below) and `longcat-sample`'s ``SampleConfig`` (at
the end). This module imports no torch or model library, so parsing flags and ``--help`` stay instant.

``TrainConfig`` is filled from TOML/JSON, CLI flags, or a SimpleTuner config.

Precedence: dataclass defaults < config file < command-line flags. Every field is a flag (``--lora-rank 16``
or ``--lora_rank 16``); booleans take ``--flag`` / ``--no-flag``. A SimpleTuner ``config.json`` (bare or
``--``-prefixed keys) with its ``multidatabackend.json`` is translated by :func:`from_simpletuner`, which
logs every key it does not use.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

log = logging.getLogger(__name__)

DEFAULT_MODEL = "meituan-longcat/LongCat-Video"
DEFAULT_LORA_TARGETS = (
    "attn.qkv",
    "attn.proj",
    "cross_attn.q_linear",
    "cross_attn.kv_linear",
    "cross_attn.proj",
    "ffn.w1",
    "ffn.w2",
    "ffn.w3",
)
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adamw", "adamw8bit"),
    "lr_scheduler": ("constant", "cosine"),
    "sigma_sampling": ("logit_normal", "uniform"),
    "gradient_checkpointing": ("selective", "full", "none"),
    "mixed_precision": ("bf16", "fp32"),
    "attention_implementation": ("sdpa", "xformers", "block_sparse"),
    "base_model_precision": ("no_change", "int8-quanto", "fp8-torchao"),
    "report_to": ("tensorboard", "wandb", "none"),
}


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message names the key and the fix."""


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # -- model and data
    model: str = _f(DEFAULT_MODEL, "'tiny', an official checkpoint directory, or a hub id")
    shards: list[str] = _f([], "shard spec(s): directory, brace pattern, pipe:cmd, hf://datasets/user/name")
    frames: int = _f(93, "video frames per clip (4k+1); the shards must have been made with this count")
    i2v: bool = _f(True, "image-to-video: latent frame 0 is the clean start frame; --no-i2v trains text-to-video")
    output_dir: str = _f("output", "where checkpoints, the LoRA, logs and validation videos go")
    seed: int = _f(0, "seed for LoRA init, noise, sigmas, caption dropout and the data order")
    # -- LoRA
    lora_rank: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(0.0, "LoRA alpha (scale = alpha / rank); 0 means alpha = rank")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = _f(DEFAULT_LORA_TARGETS, "module-name suffixes of the DiT linears that get LoRA")
    # -- optimisation
    learning_rate: float = _f(1e-4, "peak learning rate")
    optimizer: str = _f("adamw", "adamw (torch, fused on CUDA) or adamw8bit (bitsandbytes)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay")
    lr_scheduler: str = _f("constant", "constant or cosine (to 0 at max_train_steps), after linear warmup")
    lr_warmup_steps: int = _f(0, "linear warmup steps from 0 to learning_rate")
    max_train_steps: int = _f(1000, "optimizer steps to train; 0 derives it from num_train_epochs")
    num_train_epochs: float = _f(0.0, "epochs (of epoch_samples samples) when max_train_steps is 0")
    train_batch_size: int = _f(1, "clips per batch per GPU (one bucket per batch)")
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this; 0 turns clipping off")
    # -- flow matching
    flow_schedule_shift: float = _f(12.0, "sigma shift s' = shift*s/(1+(shift-1)*s); 12 for 480p")
    sigma_sampling: str = _f("logit_normal", "training sigma distribution: logit_normal or uniform")
    logit_mean: float = _f(0.0, "mean of the logit-normal sigma distribution")
    logit_std: float = _f(1.0, "std of the logit-normal sigma distribution")
    caption_dropout: float = _f(0.0, "probability of training a clip on the empty prompt (for CFG)")
    # -- memory and speed
    gradient_checkpointing: str = _f("selective", "selective (keep attention outputs), full, or none")
    mixed_precision: str = _f("bf16", "bf16 base weights + autocast on CUDA; the CPU always runs fp32")
    attention_implementation: str = _f("sdpa", "sdpa, xformers or block_sparse")
    compile: bool = _f(False, "torch.compile each DiT block step: fuses the fp32 elementwise work (not with block swap)")
    compile_tune: bool = _f(False, "with compile: tune the fused kernels' launch settings (coordinate descent); "
                            "about 4 min more compilation the first time (then cached) for slightly faster steps")
    feed_forward_chunks: int = _f(1, "run each block's feed-forward in this many latent-frame groups in training: "
                                  "lower peak memory (24 GB cards: 4) for one more feed-forward pass")
    fsdp: bool = _f(False, "shard the base model over GPUs with FSDP2 (per block) instead of replicating it")
    musubi_blocks_to_swap: int = _f(0, "DiT blocks kept on block_swap_device and streamed in (needs offload.py)")
    block_swap_device: str = _f("cpu", "where swapped blocks live")
    offload_activations: bool = _f(False, "keep what autograd saves for backward (with checkpointing: each block's "
                                   "input) in pinned host memory, copied on a side stream; for 24 GB cards")
    base_model_precision: str = _f("no_change", "no_change, int8-quanto or fp8-torchao base weights (needs quant.py)")
    fp8_matmuls: bool = _f(False, "float8 matmuls for the frozen base linears, weights kept in bf16 (GPUs with "
                           "compute capability 8.9+): the block-sparse step at 480x832x93 takes 12% less time on an H100")
    # -- data loading
    num_workers: int = _f(2, "DataLoader worker processes per GPU (part of the data order)")
    shuffle_buffer: int = _f(64, "samples each worker holds for shuffling")
    resampled: bool = _f(False, "draw shards with replacement forever instead of shuffled passes")
    epoch_samples: int = _f(0, "samples per epoch for logging and num_train_epochs; 0 reads the manifest")
    pin_memory: bool = _f(True, "pinned host memory for batches (CUDA only)")
    # -- checkpoints
    checkpointing_steps: int = _f(500, "save a resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int = _f(3, "keep the newest N checkpoints (0 keeps all)")
    resume: str | None = _f(None, "'latest' (in output_dir) or a checkpoint/output directory to resume from")
    # -- logging
    report_to: str = _f("tensorboard", "tensorboard, wandb (plus tensorboard) or none")
    wandb_project: str = _f("longcat", "wandb project when report_to = wandb")
    progress: bool = _f(True, "show a progress bar")
    # -- validation
    validation_source: str | None = _f(None, "eval shards or a folder of image + .txt pairs; unset: no validation")
    validation_every: int = _f(0, "validate every N steps (0: only at the end)")
    validation_limit: int = _f(2, "validation pairs to sample")
    validation_frames: int = _f(93, "frames of each validation video")
    validation_inference_steps: int = _f(40, "sampler steps")
    validation_guidance: float = _f(4.0, "classifier-free guidance (CFG-Zero*)")
    validation_resolution: str = _f("480x832", "HxW area the start images are fitted to")
    validation_seed: int = _f(0, "sampler seed")

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):
            # SimpleTuner and TOML say true/false: true keeps attention outputs where memory allows.
            self.gradient_checkpointing = "selective" if self.gradient_checkpointing else "none"
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        self.lora_targets = list(self.lora_targets)

    def validate(self) -> None:
        """Raise ConfigError for values no run can use."""
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: choose one of {', '.join(choices)}")
        if (self.frames - 1) % 4 or self.frames < 5:
            raise ConfigError(f"frames = {self.frames}: must be 4k+1 and at least 5 (the VAE's 4x time stride)")
        if self.feed_forward_chunks < 1:
            raise ConfigError(f"feed_forward_chunks = {self.feed_forward_chunks}: must be at least 1 (1: no chunking)")
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
        if self.offload_activations and (self.compile or self.fsdp):
            raise ConfigError("offload_activations works in eager, unsharded training: turn off compile and fsdp")
        if self.compile_tune and not self.compile:
            raise ConfigError("compile_tune tunes the compiled block step: set compile too")
        if self.fp8_matmuls and self.base_model_precision not in ("no_change", "bf16"):
            raise ConfigError(f"fp8_matmuls computes in float8 from bf16 weights; base_model_precision = "
                              f"{self.base_model_precision} stores them quantised: pick one")
        if self.fsdp and self.musubi_blocks_to_swap:
            raise ConfigError("fsdp and musubi_blocks_to_swap do not combine: shard or swap, not both")

    @property
    def alpha(self) -> float:
        return self.lora_alpha or float(self.lora_rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that may change between a run and its resume: where things go and how often things happen, not
# what the model sees. Everything else must match the checkpoint.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir", "resume", "max_train_steps", "num_train_epochs", "checkpointing_steps",
        "checkpoints_total_limit", "report_to", "wandb_project", "progress", "pin_memory",
        "validation_source", "validation_every", "validation_limit", "validation_frames",
        "validation_inference_steps", "validation_guidance", "validation_resolution", "validation_seed",
    }
)  # fmt: skip


def resume_mismatch(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """``key: saved -> current`` for every key that differs and would change the training trajectory."""
    now = current.to_dict()
    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in RESUMABLE_CHANGES and _normal(saved.get(k)) != _normal(now.get(k))
    ]


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- files


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig from our own keys; an unknown key is an error with the closest known key."""
    fields = _fields()
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    return TrainConfig(**values)


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") from err


def is_simpletuner(values: dict[str, Any]) -> bool:
    keys = {k.lstrip("-") for k in values}
    return any(k.startswith("--") for k in values) or bool(keys & SIMPLETUNER_MARKERS)


def load_config(path: str | Path) -> TrainConfig:
    """Our TOML/JSON config, or a SimpleTuner config.json (detected by its keys)."""
    values = read_file(path)
    if is_simpletuner(values):
        return TrainConfig(**from_simpletuner(values, base_dir=Path(path).parent))
    return from_dict(values, str(path))


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- SimpleTuner import

SIMPLETUNER_MARKERS = frozenset({"model_family", "model_type", "data_backend_config", "pretrained_model_name_or_path"})

# SimpleTuner key -> our key, for keys whose values mean the same thing.
SIMPLETUNER_KEYS = {
    "pretrained_model_name_or_path": "model",
    "output_dir": "output_dir",
    "seed": "seed",
    "lora_rank": "lora_rank",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "learning_rate": "learning_rate",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_epsilon",
    "adam_weight_decay": "weight_decay",
    "lr_warmup_steps": "lr_warmup_steps",
    "max_train_steps": "max_train_steps",
    "num_train_epochs": "num_train_epochs",
    "train_batch_size": "train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_grad_norm": "max_grad_norm",
    "gradient_checkpointing": "gradient_checkpointing",
    "flow_schedule_shift": "flow_schedule_shift",
    "caption_dropout_probability": "caption_dropout",
    "checkpointing_steps": "checkpointing_steps",
    "checkpoints_total_limit": "checkpoints_total_limit",
    "resume_from_checkpoint": "resume",
    "musubi_blocks_to_swap": "musubi_blocks_to_swap",
    "musubi_block_swap_device": "block_swap_device",
    "base_model_precision": "base_model_precision",
    "attention_implementation": "attention_implementation",
    "dataloader_num_workers": "num_workers",
    "tracker_project_name": "wandb_project",
    "validation_steps": "validation_every",
    "validation_num_video_frames": "validation_frames",
    "validation_num_inference_steps": "validation_inference_steps",
    "validation_guidance": "validation_guidance",
    "validation_resolution": "validation_resolution",
    "validation_seed": "validation_seed",
    "mixed_precision": "mixed_precision",
}
# Keys we read to check or translate, so they are not reported as ignored.
_SIMPLETUNER_HANDLED = {
    "model_family", "model_flavour", "model_type", "data_backend_config", "eval_dataset_id", "lr_scheduler",
    "optimizer", "report_to", "flow_use_uniform_schedule", "validation_using_datasets",
}  # fmt: skip
_SIMPLETUNER_OPTIMIZERS = {
    "adamw": "adamw", "adamw_bf16": "adamw", "optimi-adamw": "adamw", "adamw_schedulefree": "adamw",
    "adamw8bit": "adamw8bit", "bnb-adamw8bit": "adamw8bit", "bnb-adamw-8bit": "adamw8bit",
}  # fmt: skip
_SIMPLETUNER_SCHEDULERS = {
    "constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine",
    "cosine_with_restarts": "cosine",
}  # fmt: skip


def from_simpletuner(values: dict[str, Any], base_dir: str | Path = ".") -> dict[str, Any]:
    """TrainConfig keyword arguments from a SimpleTuner config.json dict (+ its multidatabackend.json).

    Keys sharing a meaning map directly; dataset entries become ``shards`` (training clips),
    ``validation_source`` (``eval_dataset_id``) and ``i2v`` (``is_i2v``). Every key left unused is
    logged by name, as are values we translate approximately.
    """
    st = {k.lstrip("-"): v for k, v in values.items()}
    if st.get("model_family", "longcat_video") != "longcat_video":
        raise ConfigError(f"SimpleTuner model_family = {st['model_family']!r}: longcat-train trains longcat_video only")
    if st.get("model_type", "lora") != "lora":
        raise ConfigError(f"SimpleTuner model_type = {st['model_type']!r}: longcat-train trains LoRA only")
    out: dict[str, Any] = {}
    for key, ours in SIMPLETUNER_KEYS.items():
        if key in st and st[key] is not None:
            out[ours] = _convert(ours, st[key])
    if "optimizer" in st:
        out["optimizer"] = _translate("optimizer", st["optimizer"], _SIMPLETUNER_OPTIMIZERS, "adamw")
    if "lr_scheduler" in st:
        out["lr_scheduler"] = _translate("lr_scheduler", st["lr_scheduler"], _SIMPLETUNER_SCHEDULERS, "constant")
    if st.get("flow_use_uniform_schedule"):
        out["sigma_sampling"] = "uniform"
    if "report_to" in st:
        out["report_to"] = st["report_to"] if st["report_to"] in CHOICES["report_to"] else "tensorboard"
    if out.get("base_model_precision") not in (None, *CHOICES["base_model_precision"]):
        log.warning("SimpleTuner base_model_precision %r is not supported: using no_change", out["base_model_precision"])
        out["base_model_precision"] = "no_change"
    if out.get("attention_implementation") not in (None, *CHOICES["attention_implementation"]):
        log.warning("SimpleTuner attention_implementation %r: using sdpa", out["attention_implementation"])
        out["attention_implementation"] = "sdpa"
    if out.get("mixed_precision") not in (None, *CHOICES["mixed_precision"]):
        out["mixed_precision"] = "bf16"
    if out.get("resume") is not None and str(out["resume"]).lower() in ("latest", "true"):
        out["resume"] = "latest"

    if "data_backend_config" in st:
        out.update(_datasets(st, Path(base_dir)))
    elif "eval_dataset_id" in st:
        log.warning("SimpleTuner eval_dataset_id %r ignored: no data_backend_config to find it in", st["eval_dataset_id"])

    ignored = sorted(k for k in st if k not in SIMPLETUNER_KEYS and k not in _SIMPLETUNER_HANDLED)
    if ignored:
        log.warning("SimpleTuner keys not used by longcat-train: %s", ", ".join(ignored))
    return out


def _convert(name: str, value: Any) -> Any:
    kind = typing.get_type_hints(TrainConfig)[name]
    if name == "gradient_checkpointing" and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind is int:
        return int(float(value))
    if kind is float:
        return float(value)
    if kind is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return value


def _translate(key: str, value: str, table: dict[str, str], fallback: str) -> str:
    if value in table:
        return table[value]
    log.warning("SimpleTuner %s %r has no counterpart: using %s", key, value, fallback)
    return fallback


def _datasets(st: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Translate the multidatabackend.json entries."""
    path = Path(st["data_backend_config"]).expanduser()
    if not path.is_absolute() and not path.is_file():
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(f"SimpleTuner data_backend_config {st['data_backend_config']} not found (also tried {path})")
    backends = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    shards: list[str] = []
    eval_id = st.get("eval_dataset_id")
    found_eval = False
    for entry in backends:
        name = entry.get("id", "?")
        if entry.get("disabled") or entry.get("disable"):
            log.info("dataset %s is disabled: skipped", name)
            continue
        location = _dataset_location(entry)
        if name == eval_id:
            found_eval = True
            out["validation_source"] = location
        elif entry.get("dataset_type") == "conditioning":
            log.info("dataset %s (conditioning): start frames come from the shards' cond.safetensors, not used", name)
        elif entry.get("dataset_type", "video") in ("video", "image") and location is not None:
            shards.append(location)
            if "is_i2v" in entry:
                out["i2v"] = bool(entry["is_i2v"])
            unused = sorted(set(entry) - {"id", "type", "dataset_type", "is_i2v", "instance_data_dir", "dataset_name",
                                          "conditioning_data", "disabled"})
            if unused:
                log.info("dataset %s: keys used by longcat-prep, not the trainer: %s", name, ", ".join(unused))
        else:
            log.warning("dataset %s (type %s) not used", name, entry.get("type"))
    if shards:
        out["shards"] = shards
    if eval_id is not None and not found_eval:
        log.warning("SimpleTuner eval_dataset_id %r is not in %s: no validation source", eval_id, path)
    return out


def _dataset_location(entry: dict[str, Any]) -> str | None:
    if entry.get("type") == "huggingface" and entry.get("dataset_name"):
        return f"hf://datasets/{entry['dataset_name']}"
    return entry.get("instance_data_dir")


# ---------------------------------------------------------------- command line


def build_parser(prog: str = "longcat-train") -> argparse.ArgumentParser:
    """A flag per TrainConfig field (defaults suppressed, so only given flags override the file)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a LongCat-Video LoRA from longcat-prep shards.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="TOML/JSON config, or a SimpleTuner config.json")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kind = hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help = f"{f.metadata['help']} [default: {' '.join(default) if isinstance(default, list) else default}]"
        help = help.replace("%", "%%")  # argparse formats help strings with %
        if f.name == "resume":
            parser.add_argument(*flags, nargs="?", const="latest", dest=f.name, metavar="DIR", help=help)
        elif kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, dest=f.name, help=help)
        elif typing.get_origin(kind) is list:
            parser.add_argument(*flags, nargs="+", dest=f.name, help=help)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(*flags, type=base, dest=f.name, choices=CHOICES.get(f.name), help=help)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    base = load_config(path).to_dict() if path else {}
    cfg = TrainConfig(**{**base, **args})
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- the longcat-sample command

DEFAULT_AREA = (480, 832)
DEFAULT_FRAMES = 93
DEFAULT_STEPS = 40
DEFAULT_GUIDANCE = 4.0
DEFAULT_SHIFT = 12.0
DEFAULT_FPS = 15


@dataclass
class SampleConfig:
    """What ``longcat-sample`` does; one field per flag. ``None`` sizes mean the model's defaults."""

    model: str = DEFAULT_MODEL
    image: str | None = None
    prompts: list[str] = field(default_factory=list)
    output: str = "out.mp4"
    lora: list[str] = field(default_factory=list)  # one to sample with; with serve, the page's choices
    lora_strength: float = 1.0
    frames: int | None = None  # default 93; 17 for the tiny model
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    shift: float = DEFAULT_SHIFT
    seed: int = 0
    size: tuple[int, int] | None = None  # bucket area; default 480x832, 192x320 for the tiny model
    fps: int = DEFAULT_FPS
    negative_prompt: str = ""
    gif: bool = False
    save_frames: bool = False
    vae_tiling: bool = False
    block_swap: int = 0
    attention: str = "sdpa"  # block_sparse: ~1.8x faster at 480x832x93, not the computation of the dense model
    device: str | None = None
    serve: bool = False
    host: str = "127.0.0.1"
    port: int = 7860
    serve_dir: str = "longcat_previews"
    max_upload_mb: float = 20.0

    def __post_init__(self) -> None:
        # The tiny model is for trying the tools on a CPU: its defaults are the demo clips' small size.
        from longcat_data.demo import DEMO_AREA, DEMO_FRAMES

        tiny = self.model == "tiny"
        if self.size is None:
            self.size = DEMO_AREA if tiny else DEFAULT_AREA
        if self.frames is None:
            self.frames = DEMO_FRAMES if tiny else DEFAULT_FRAMES
