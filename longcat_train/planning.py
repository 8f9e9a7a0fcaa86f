"""``longcat-train --plan`` and ``--memory-budget``: the memory plan (``memory_plan``) fed with the model's
shape (a meta-device DiT: no weights load), the clip, the GPU, and the techniques' rules.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from longcat_data.defaults import DEFAULT_MODEL, TINY, default_frames
from longcat_data.flags import ConfigError, flag_names, parse_area
from longcat_train import memory_plan as mp
from longcat_train.config import TrainConfig
from longcat_train.memory_plan import GB, Flags, ModelShape, Options, Prediction, Workload
from longcat_train.model import DiTConfig, LongCatVideoTransformer, block_linears
from longcat_train.techniques import RULES

log = logging.getLogger(__name__)

# The packages each quantised base needs (installed or not decides whether the plan proposes it).
_QUANT_PACKAGES = {"int8-quanto": "optimum.quanto", "fp8-torchao": "torchao"}


# ------------------------------------------------------------------------------------------ the model


def dit_config(model: str) -> DiTConfig:
    """The DiT config of ``--model`` without its weights: tiny, a local checkpoint's ``dit/config.json``,
    the default model's (the released full config), or another hub id's config file alone."""
    if model == TINY:
        return DiTConfig.tiny()
    path = Path(model).expanduser()
    for candidate in (path / "dit" / "config.json", path / "config.json"):
        if candidate.is_file():
            return DiTConfig.from_dict(json.loads(candidate.read_text()))
    if path.exists() or model.startswith(("/", ".", "~")):
        raise ConfigError(f"model = {model}: no dit/config.json there (a checkpoint in the official layout)")
    if model == DEFAULT_MODEL:
        return DiTConfig.full()
    from huggingface_hub import hf_hub_download

    try:
        return DiTConfig.from_dict(json.loads(Path(hf_hub_download(model, "dit/config.json")).read_text()))
    except Exception as err:  # noqa: BLE001 -- any hub failure is one line naming the model
        raise ConfigError(f"model = {model}: cannot read its dit/config.json from the hub ({err})") from None


def model_shape(config: DiTConfig, lora_targets: list[str]) -> ModelShape:
    """Parameter counts of a meta-device DiT (no memory, no weights) and its LoRA at rank 1."""
    with torch.device("meta"):
        model = LongCatVideoTransformer(config)
    block = model.blocks[0]
    block_params = sum(p.numel() for p in block.parameters())
    linears = [linear for _, linear in block_linears(block)]

    def lora_params(module: torch.nn.Module) -> int:
        return sum(
            m.in_features + m.out_features
            for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)
            and any(name == t or name.endswith(f".{t}") for t in lora_targets)
        )

    in_blocks = lora_params(block)
    return ModelShape(
        depth=config.depth,
        hidden=config.hidden_size,
        heads=config.num_heads,
        ffn=config.ffn_hidden_size,
        text_tokens=config.text_max_length,
        patch=tuple(config.patch_size[1:]),
        block_params=block_params,
        block_linear_params=sum(m.weight.numel() for m in linears),
        block_linear_rows=sum(m.out_features for m in linears),
        outer_params=sum(p.numel() for p in model.parameters()) - config.depth * block_params,
        lora_params_per_rank=(in_blocks, lora_params(model) - config.depth * in_blocks),
    )


_REFERENCE: mp.Calibration | None = None


def calibration() -> mp.Calibration:
    """The constants of the measured model (the full DiT, default LoRA targets), computed once."""
    global _REFERENCE
    if _REFERENCE is None:
        _REFERENCE = mp.calibrate(model_shape(DiTConfig.full(), list(TrainConfig().lora_targets)))
    return _REFERENCE


# ------------------------------------------------------------------------------------------ flags


def flags_of(cfg: TrainConfig, depth: int) -> Flags:
    return Flags(
        checkpointing=(cfg.gradient_checkpointing,) * depth,
        attention=cfg.attention,
        compile=cfg.compile,
        fp8_matmuls=cfg.fp8_matmuls,
        base_model_precision=cfg.base_model_precision,
        block_swap=cfg.block_swap,
        offload_activations=cfg.offload_activations,
        feed_forward_chunks=cfg.feed_forward_chunks,
    )


def config_with(cfg: TrainConfig, flags: Flags) -> TrainConfig:
    """``cfg`` with the plan's flags (a uniform mode stands for the blocks' modes: the strictest one)."""
    strictest = next((m for m in reversed(mp.MODES) if m in flags.checkpointing), "full")
    return replace(
        cfg,
        gradient_checkpointing=strictest,
        compile=flags.compile,
        compile_tune=cfg.compile_tune and flags.compile,
        fp8_matmuls=flags.fp8_matmuls,
        base_model_precision=flags.base_model_precision,
        block_swap=flags.block_swap,
        offload_activations=flags.offload_activations,
        feed_forward_chunks=flags.feed_forward_chunks,
    )


def allowed(cfg: TrainConfig, flags: Flags) -> bool:
    """Whether ``techniques.RULES`` accept the plan's flags on top of ``cfg``."""
    candidate = config_with(cfg, flags)
    return not any(rule.clashes(candidate) for rule in RULES)


def workload(cfg: TrainConfig, area: tuple[int, int] | None = None) -> Workload:
    height, width = area or parse_area(cfg.area)
    return Workload(
        frames=cfg.frames or default_frames(cfg.model),  # unset: the shards' frames are not known here
        height=height,
        width=width,
        batch=cfg.train_batch_size,
        lora_rank=cfg.lora_rank,
        activation_bytes=2 if cfg.mixed_precision == "bf16" else 4,
    )


# ------------------------------------------------------------------------------------------ the GPU


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: float
    fp8: bool  # float8 tensor cores (compute capability 8.9+)


def detect_gpu(gpu_memory_gb: float | None, device: torch.device | None = None) -> Gpu:
    """The GPU the plan is for: ``gpu_memory_gb`` given (a Hopper-class card of that memory), else the CUDA
    ``device`` (default: the first); neither is a ConfigError naming the flag."""
    if gpu_memory_gb is not None:
        return Gpu(f"a {gpu_memory_gb:g} GB GPU", gpu_memory_gb * GB, fp8=True)
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        raise ConfigError(
            "no CUDA device to plan for: give its memory (--gpu-memory GB with --plan, a number with "
            "--memory-budget)"
        )
    props = torch.cuda.get_device_properties(device or 0)
    return Gpu(props.name, float(props.total_memory), fp8=(props.major, props.minor) >= (8, 9))


def budget_bytes(cfg: TrainConfig, gpu: Gpu | None = None) -> float:
    """``memory_budget`` in bytes: a number of GB, or ``auto``: the GPU's memory."""
    if cfg.memory_budget == "auto":
        return (gpu or detect_gpu(None)).memory_bytes
    return float(cfg.memory_budget) * GB


def options(gpu: Gpu) -> Options:
    installed = tuple(
        p for p, module in _QUANT_PACKAGES.items() if importlib.util.find_spec(module.split(".")[0])
    )
    return Options(fp8_matmuls=gpu.fp8, quantised=installed)


# ------------------------------------------------------------------------------------------ the trainer


def planned_checkpointing(
    cfg: TrainConfig, area: tuple[int, int] | None, gpu: Gpu | None = None
) -> tuple[str, ...]:
    """``--memory-budget``: the per-block checkpointing for ``cfg``'s other flags at the clip ``area``
    (the largest bucket the shards hold), or a ConfigError naming what to change when nothing fits."""
    shape = model_shape(dit_config(cfg.model), list(cfg.lora_targets))
    work = workload(cfg, area)
    budget = budget_bytes(cfg, gpu)
    modes = mp.plan_checkpointing(shape, work, flags_of(cfg, shape.depth), budget, calibration())
    if modes is None:
        raise ConfigError(
            f"memory_budget = {cfg.memory_budget}: even full checkpointing on every block is predicted not "
            f"to fit {budget / GB:.0f} GB at {work.height}x{work.width}x{work.frames}; run longcat-train --plan "
            "with the same flags for settings that do"
        )
    log.info(
        "memory budget %.0f GB at %dx%dx%d: checkpointing per block %s",
        budget / GB,
        work.height,
        work.width,
        work.frames,
        ", ".join(f"{mode} x{n}" for mode, n in mp.mode_counts(modes).items()),
    )
    return modes


def budget_checkpointing(cfg: TrainConfig, manifest: dict | None, device: torch.device) -> tuple[str, ...]:
    """What the trainer applies under ``memory_budget``: the plan for the largest bucket of the manifest
    (else ``cfg.area``) on ``device``."""
    gpu = detect_gpu(None, device) if cfg.memory_budget == "auto" else None
    return planned_checkpointing(cfg, largest_bucket(manifest, cfg.frames), gpu)


def largest_bucket(manifest: dict | None, frames: int) -> tuple[int, int] | None:
    """The (h, w) of the manifest's bucket with the most pixels at ``frames`` frames (None: none listed)."""
    sizes = []
    for name in (manifest or {}).get("buckets", {}):
        try:
            h, w, f = (int(x) for x in name.split("x"))
        except ValueError:
            continue
        if f == frames:
            sizes.append((h * w, (h, w)))
    return max(sizes)[1] if sizes else None


# ------------------------------------------------------------------------------------------ --plan


def _flag_args(cfg: TrainConfig, plan_cfg: TrainConfig) -> list[str]:
    """The command-line flags that differ from the defaults in ``plan_cfg``'s technique fields."""
    default = TrainConfig()
    args = []
    # Checkpointing is left to --memory-budget, which the command line carries.
    for name in (n for n in _TECHNIQUE_FIELDS if n != "gradient_checkpointing"):
        value = getattr(plan_cfg, name)
        if value == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return args


def plan_report(cfg: TrainConfig, argv: list[str]) -> list[str]:
    """The lines ``longcat-train --plan`` prints: the current flags' prediction, the fastest flags that fit
    and the command line that runs them (``argv`` without the plan's own flags, plus the plan's)."""
    gpu = detect_gpu(cfg.gpu_memory)
    budget = gpu.memory_bytes if cfg.memory_budget in (None, "auto") else budget_bytes(cfg, gpu)
    shape = model_shape(dit_config(cfg.model), list(cfg.lora_targets))
    work = workload(cfg)
    cal = calibration()
    current = flags_of(cfg, shape.depth)
    clip = f"{work.height}x{work.width}x{work.frames}, batch {work.batch}"
    lines = [f"plan for {gpu.name} ({budget / GB:.0f} GB budget), {clip}, LoRA rank {work.lora_rank}"]
    lines.append("current flags: " + _summary(mp.predict(shape, work, current, cal), budget, cal))
    best = mp.fastest_plan(
        shape, work, current, budget, allowed=lambda f: allowed(cfg, f), cal=cal, options=options(gpu)
    )
    if best is None:
        lines.append(f"nothing fits {budget / GB:.0f} GB at {clip}: lower the frames or the area")
        return lines
    flags, prediction = best
    lines.append("fastest that fits: " + _summary(prediction, budget, cal))
    lines.append(
        "  checkpointing per block: "
        + ", ".join(f"{m} x{n}" for m, n in mp.mode_counts(flags.checkpointing).items())
    )
    lines.append("  memory: " + ", ".join(f"{k} {_size(v)}" for k, v in prediction.memory.items()))
    lines.append("  step: " + ", ".join(f"{k} {v:.2f} s" for k, v in prediction.time.items()))
    command = ["longcat-train", *_kept_args(argv), *_flag_args(cfg, config_with(cfg, flags))]
    command += ["--memory-budget", f"{budget / GB:g}"]
    lines.append("run: " + shlex.join(command))
    notes = ["checked against the GPU by benchmarks/plan_check.py", "step times of an H200/H100-class GPU"]
    if current.fp8_matmuls and not current.compile:
        notes += cal.derived
    lines.append(f"({'; '.join(notes)})")
    return lines


def _summary(prediction: Prediction, budget: float, cal: mp.Calibration) -> str:
    fits = "fits" if prediction.peak_bytes * cal.reserve <= budget else "does not fit"
    return f"peak {_size(prediction.peak_bytes)} ({fits}), {prediction.step_seconds:.2f} s/step"


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


_PLAN_FIELDS = ("plan", "gpu_memory", "memory_budget")
_TECHNIQUE_FIELDS = (
    "attention",
    "compile",
    "compile_tune",
    "fp8_matmuls",
    "base_model_precision",
    "block_swap",
    "offload_activations",
    "feed_forward_chunks",
    "gradient_checkpointing",
)


def _replaced_flags() -> dict[str, bool]:
    """Every spelling of the flags the plan's command line sets itself -> whether it takes a value."""
    spellings: dict[str, bool] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _PLAN_FIELDS + _TECHNIQUE_FIELDS:
            continue
        boolean = isinstance(f.default, bool)
        for name in flag_names(f):
            spellings[name] = not boolean and f.name != "plan"
            if boolean:
                spellings["--no-" + name[2:]] = False
    return spellings


def _kept_args(argv: list[str]) -> list[str]:
    """``argv`` without the plan's own flags and those of the techniques the plan chooses."""
    replaced, kept, skip = _replaced_flags(), [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in replaced:
            skip = replaced[name] and "=" not in arg
            continue
        kept.append(arg)
    return kept
