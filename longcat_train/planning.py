"""``longcat-train --plan``, ``--memory-budget`` and the auto defaults: the memory plan (``memory_plan``)
fed with the model's shape (a meta-device DiT: no weights load), the clip, the GPU, and the techniques'
rules; :func:`resolve_auto` turns the defaults left to the device into values for it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shlex
import shutil
import sysconfig
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from longcat_data.defaults import DEFAULT_MODEL, TINY, default_frames
from longcat_data.flags import ConfigError, flag_names, parse_area
from longcat_train import memory_plan as mp
from longcat_train.config import AUTO, TrainConfig
from longcat_train.dit_config import DiTConfig
from longcat_train.memory_plan import GB, Flags, ModelShape, Options, Prediction, Workload
from longcat_train.model import LongCatVideoTransformer, block_linears
from longcat_train.quant import FP8_CAPABILITY
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


@functools.cache
def _shape_of(model: str, lora_targets: tuple[str, ...]) -> ModelShape:
    return model_shape(dit_config(model), list(lora_targets))


def shape_of(cfg: TrainConfig) -> ModelShape:
    """The model shape of ``cfg``'s model and LoRA targets (built once per pair)."""
    return _shape_of(cfg.model, tuple(cfg.lora_targets))


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
        compile=bool(cfg.compile),
        fp8_matmuls=bool(cfg.fp8_matmuls),
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
    """A CUDA device as the plan and the auto flags see it."""

    name: str
    memory_bytes: float
    capability: tuple[int, int] = (9, 0)  # CUDA compute capability (major, minor)
    no_compile: str | None = None  # why torch.compile cannot build kernels on this machine (None: it can)

    @property
    def fp8(self) -> bool:
        """Float8 tensor cores: where ``quant.check_fp8_matmuls`` passes."""
        return self.capability >= FP8_CAPABILITY


def detect_gpu(gpu_memory_gb: float | None, device: torch.device | None = None) -> Gpu:
    """The GPU the plan is for: ``gpu_memory_gb`` given (a Hopper-class card of that memory), else the CUDA
    ``device`` (default: the first); neither is a ConfigError naming the flag."""
    if gpu_memory_gb is not None:
        return Gpu(f"a GPU with {gpu_memory_gb:g} GB", gpu_memory_gb * GB)
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        raise ConfigError(
            "no CUDA device to plan for: give its memory (--gpu-memory GB with --plan, a number with "
            "--memory-budget)"
        )
    props = torch.cuda.get_device_properties(device or 0)
    return Gpu(props.name, float(props.total_memory), (props.major, props.minor), compile_unavailable())


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot build the block step's CUDA kernels on this machine (None: it can).
    Inductor writes them in Triton, and Triton builds its kernel launchers with the system's C compiler and
    Python's headers the first time: without them, a compiled run would fail at its first step, after the
    model loaded."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    compilers = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    if not any(shutil.which(c) for c in compilers):
        return f"no C compiler ({', '.join(compilers)}) for Triton's kernel launchers"
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.is_file():
        return f"no Python headers ({headers}; the python3-dev package) for Triton's kernel launchers"
    return None


def device_gpu(device: torch.device) -> Gpu | None:
    """The CUDA ``device`` as a :class:`Gpu`; None for any other device."""
    return detect_gpu(None, device) if device.type == "cuda" else None


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
) -> tuple[str, ...] | None:
    """``--memory-budget``: the per-block checkpointing for ``cfg``'s other flags at the clip ``area``
    (the largest bucket the shards hold); None when not even full checkpointing fits."""
    shape = shape_of(cfg)
    return mp.plan_checkpointing(
        shape, workload(cfg, area), flags_of(cfg, shape.depth), budget_bytes(cfg, gpu), calibration()
    )


# Where a run's plan finds nothing that fits, what to do next; --plan itself answers it on the next line.
PLAN_HINT = "; run longcat-train --plan with the same flags for settings that do"


def _nothing_fits(cfg: TrainConfig, area: tuple[int, int] | None, gpu: Gpu | None, *, auto: bool) -> str:
    work = workload(cfg, area)
    budget = "the GPU's memory" if auto else f"memory_budget = {cfg.memory_budget}"
    return (
        f"{budget}: even full checkpointing on every block is predicted not to fit "
        f"{budget_bytes(cfg, gpu) / GB:.0f} GB at {work.height}x{work.width}x{work.frames}{PLAN_HINT}"
    )


# ------------------------------------------------------------------------------------------ the defaults


@dataclass(frozen=True)
class Resolved:
    """What ``resolve_auto`` made of a config for a device.

    Attributes:
        cfg: the config with every auto replaced by its value (what a run saves and resumes with).
        checkpointing: the per-block modes under ``cfg.memory_budget`` (None: ``cfg.gradient_checkpointing``
            on every block).
        line: the values the autos took, as flags, and why (None: the config had no auto).
        plan: the per-block plan's summary (None: no plan).
        warning: the auto memory plan found nothing that fits (it falls back to full checkpointing).
        problem: an explicit ``memory_budget`` nothing fits (the trainer refuses it with this line).
    """

    cfg: TrainConfig
    checkpointing: tuple[str, ...] | None = None
    line: str | None = None
    plan: str | None = None
    warning: str | None = None
    problem: str | None = None


def is_auto(cfg: TrainConfig, name: str) -> bool:
    """Whether the field ``name`` is left to the device (``compile`` and ``fp8_matmuls``: None,
    ``gradient_checkpointing``: auto)."""
    return getattr(cfg, name) in (None, AUTO)


AUTO_FIELDS = ("compile", "fp8_matmuls", "gradient_checkpointing")


def with_saved_autos(cfg: TrainConfig, saved: dict | None) -> TrainConfig:
    """``cfg`` resuming a run that saved ``saved``: each auto takes the value the run resolved it to (and
    an auto checkpointing the run's memory budget too), so the resumed run computes what it did."""
    values = {
        name: saved[name]
        for name in AUTO_FIELDS
        if is_auto(cfg, name) and saved and saved.get(name) not in (None, AUTO)
    }
    if "gradient_checkpointing" in values and cfg.memory_budget is None:
        values["memory_budget"] = saved.get("memory_budget")
    return replace(cfg, **values)


def _accepts(cfg: TrainConfig, setting: str) -> bool:
    """Whether no rule of ``techniques.RULES`` about ``setting`` clashes in ``cfg``."""
    return not any(rule.clashes(cfg) for rule in RULES if setting in rule.settings)


def _fp8_applies(cfg: TrainConfig, gpu: Gpu) -> bool:
    """Auto float8 matmuls: compiled (the path with a measured step), on float8 tensor cores, from bf16
    weights of an unquantised base."""
    candidate = replace(cfg, fp8_matmuls=True)
    return (
        bool(cfg.compile) and gpu.fp8 and cfg.mixed_precision == "bf16" and _accepts(candidate, "fp8_matmuls")
    )


def resolve_auto(
    cfg: TrainConfig, gpu: Gpu | None, *, steps: int | None = None, area: tuple[int, int] | None = None
) -> Resolved:
    """The values of ``cfg``'s autos on ``gpu`` (None: no CUDA device) for a run of ``steps`` optimizer
    steps (None: not known, counted as long enough) at the clip ``area`` (default ``cfg.area``); explicit
    values stay as they are. An auto never takes a value that a rule of ``techniques.RULES`` refuses.

    - ``gradient_checkpointing``: on CUDA, without ``fsdp`` or an explicit ``memory_budget``, the memory
      plan under the GPU's memory (``memory_budget = auto``; nothing fitting: full on every block, with a
      warning); else selective.
    - ``compile``: off without CUDA, where it cannot build kernels (``Gpu.no_compile``) and with block swap,
      activation offload or fsdp; else on when the run's
      steps save more than compiling costs (``memory_plan.compile_cost``), each way with its own
      checkpointing plan, and it fits where eager does.
    - ``fp8_matmuls``: on where compiled on a GPU with float8 tensor cores, bf16, unquantised base.
    """
    autos = [name for name in AUTO_FIELDS if is_auto(cfg, name)]
    base = replace(cfg, gradient_checkpointing="selective") if is_auto(cfg, "gradient_checkpointing") else cfg
    notes: list[str] = []
    if gpu is None:
        chosen = replace(base, compile=bool(cfg.compile), fp8_matmuls=bool(cfg.fp8_matmuls))
        return _with_plan(cfg, chosen, autos, area, gpu, [])

    planned = is_auto(cfg, "gradient_checkpointing") and cfg.memory_budget is None
    if planned and _accepts(replace(base, memory_budget=AUTO), "memory_budget"):
        base = replace(base, memory_budget=AUTO)
    elif planned:
        notes.append("no per-block plan with " + _clash(replace(base, memory_budget=AUTO), "memory_budget"))

    compile_options = [cfg.compile]
    if cfg.compile is None:
        # FSDP2 all-gathers each block's weights around its call, which the compiled block step has not
        # been measured with.
        can = not base.fsdp and gpu.no_compile is None and _accepts(replace(base, compile=True), "compile")
        compile_options = [False, True] if can else [False]
        if gpu.no_compile is not None:
            notes.append(f"no compile: {gpu.no_compile}")
        elif not can:
            with_ = "fsdp" if base.fsdp else _clash(replace(base, compile=True), "compile")
            notes.append(f"no compile with {with_}")
    shape, work, cal = shape_of(base), workload(base, area), calibration()
    budget = budget_bytes(base, gpu) if base.memory_budget is not None else None

    def candidate(compile_: bool) -> tuple[TrainConfig, tuple[str, ...] | None, float]:
        one = replace(base, compile=compile_)
        if cfg.fp8_matmuls is None:
            one = replace(one, fp8_matmuls=_fp8_applies(one, gpu))
        flags = flags_of(one, shape.depth)
        modes = (
            flags.checkpointing if budget is None else mp.plan_checkpointing(shape, work, flags, budget, cal)
        )
        if modes is None and cfg.fp8_matmuls is None and one.fp8_matmuls:
            # compiled float8 trains under selective at most (memory_plan.floor_mode): without float8
            # the plan may fall back on full checkpointing
            one = replace(one, fp8_matmuls=False)
            flags = flags_of(one, shape.depth)
            modes = mp.plan_checkpointing(shape, work, flags, budget, cal)
        uniform = replace(flags, checkpointing=modes or (mp.floor_mode(flags),) * shape.depth)
        return one, modes, mp.predict(shape, work, uniform, cal).step_seconds

    options = [candidate(bool(c)) for c in compile_options]
    chosen, modes, seconds = options[0]
    if len(options) == 2:
        compiled, compiled_modes, compiled_seconds = options[1]
        saved = (seconds - compiled_seconds) * cfg.gradient_accumulation_steps * (steps or 0)
        cost = mp.compile_cost(compiled_modes or ("full",), cal)
        pays = steps is None or saved > cost
        fits = compiled_modes is not None or budget is None or modes is None
        if pays and fits:
            chosen = compiled
        why = "steps not known" if steps is None else f"{steps} steps save ~{saved:.0f} s"
        notes.append(f"{why}, compiling takes ~{cost:.0f} s" + ("" if fits else ", does not fit compiled"))
    if cfg.fp8_matmuls is None and chosen.compile and not chosen.fp8_matmuls:
        notes.append(_no_fp8(chosen, gpu))
    return _with_plan(cfg, chosen, autos, area, gpu, notes)


def _no_fp8(cfg: TrainConfig, gpu: Gpu) -> str:
    """Why auto float8 matmuls are off for the compiled ``cfg``."""
    if not gpu.fp8:
        return f"no float8 tensor cores (compute capability {gpu.capability[0]}.{gpu.capability[1]})"
    if cfg.mixed_precision != "bf16":
        return f"no float8 matmuls in {cfg.mixed_precision}"
    candidate = replace(cfg, fp8_matmuls=True)
    if not _accepts(candidate, "fp8_matmuls"):
        setting = _clash(candidate, "fp8_matmuls")
        return f"no float8 matmuls with {setting} = {getattr(cfg, setting)}"
    return "no float8 matmuls: compiled, they train under selective checkpointing at most, which does not fit"


def _clash(cfg: TrainConfig, setting: str) -> str:
    """The other setting of the first rule about ``setting`` that clashes in ``cfg``."""
    rule = next(r for r in RULES if setting in r.settings and r.clashes(cfg))
    return next(s for s in rule.settings if s != setting)


def _with_plan(
    original: TrainConfig,
    chosen: TrainConfig,
    autos: list[str],
    area: tuple[int, int] | None,
    gpu: Gpu | None,
    notes: list[str],
) -> Resolved:
    """``chosen`` with its per-block checkpointing under its memory budget, and the line naming what the
    autos became; an auto budget nothing fits falls back to full checkpointing on every block."""
    modes = planned_checkpointing(chosen, area, gpu) if chosen.memory_budget is not None else None
    plan = warning = problem = None
    auto_budget = chosen.memory_budget is not None and original.memory_budget is None
    if auto_budget:
        gb = f"{budget_bytes(chosen, gpu) / GB:.0f} GB"
        fitted = f"checkpointing planned per block under {gb}"
        notes = [fitted if modes is not None else f"nothing fits {gb}: full on every block", *notes]
    if chosen.memory_budget is not None and modes is None:
        if auto_budget:
            warning = _nothing_fits(chosen, area, gpu, auto=True)
            chosen = replace(chosen, memory_budget=None, gradient_checkpointing="full")
        else:
            problem = _nothing_fits(chosen, area, gpu, auto=False)
    if modes is not None:
        work = workload(chosen, area)
        plan = (
            f"memory budget {budget_bytes(chosen, gpu) / GB:.0f} GB at {work.height}x{work.width}x"
            f"{work.frames}: checkpointing per block {counts(modes)}"
        )
    line = None
    if autos:
        where = f"on {gpu.name}" if gpu is not None else "without a CUDA device"
        flags = " ".join(_auto_flags(chosen, autos, planned=auto_budget and modes is not None))
        line = f"auto flags {where}: {flags}" + (f" ({'; '.join(notes)})" if notes else "")
    return Resolved(chosen, modes, line, plan, warning, problem)


def counts(modes: tuple[str, ...]) -> str:
    """``none x5, selective x43``."""
    return ", ".join(f"{mode} x{n}" for mode, n in mp.mode_counts(modes).items())


def _auto_flags(cfg: TrainConfig, autos: list[str], *, planned: bool) -> list[str]:
    """The flags that set the resolved autos of ``cfg`` explicitly (``planned``: checkpointing is the
    memory plan's under the GPU's memory)."""
    flags = []
    for name in autos:
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags += ["--memory-budget", AUTO] if planned else [flag, value]
    return flags


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
    budget = gpu.memory_bytes if cfg.memory_budget in (None, AUTO) else budget_bytes(cfg, gpu)
    # What the defaults give on this GPU: the trainer's resolution for the same steps and clip.
    resolved = resolve_auto(cfg, gpu, steps=cfg.total_steps(cfg.epoch_samples) or None)
    cfg = resolved.cfg
    shape = shape_of(cfg)
    work = workload(cfg)
    cal = calibration()
    current = flags_of(cfg, shape.depth)
    if resolved.checkpointing is not None:
        current = replace(current, checkpointing=resolved.checkpointing)
    clip = f"{work.height}x{work.width}x{work.frames}, batch {work.batch}"
    lines = [f"plan for {gpu.name} ({budget / GB:.0f} GB budget), {clip}, LoRA rank {work.lora_rank}"]
    lines.append("current flags: " + _summary(mp.predict(shape, work, current, cal), budget, cal))
    warning = resolved.warning and resolved.warning.removesuffix(PLAN_HINT)
    lines += [f"  {text}" for text in (resolved.line, resolved.plan, warning) if text]
    best = mp.fastest_plan(
        shape, work, current, budget, allowed=lambda f: allowed(cfg, f), cal=cal, options=options(gpu)
    )
    if best is None:
        lines.append(f"nothing fits {budget / GB:.0f} GB at {clip}: lower the frames or the area")
        return lines
    flags, prediction = best
    lines.append("fastest that fits: " + _summary(prediction, budget, cal))
    lines.append("  checkpointing per block: " + counts(flags.checkpointing))
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
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _PLAN_FIELDS + _TECHNIQUE_FIELDS:
            continue
        boolean = bool in (hints[f.name], *typing.get_args(hints[f.name]))
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
