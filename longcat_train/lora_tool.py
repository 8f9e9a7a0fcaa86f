"""The work of ``longcat-lora``: inspect a LoRA file (layout, modules, ranks, alpha, split modules, the
model it fits, what ComfyUI-WanVideoWrapper would drop) and convert it to another layout."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from longcat_data.files import check_writable
from longcat_data.flags import ConfigError
from longcat_train import lora_layouts as layouts
from longcat_train.dit_config import DiTConfig
from longcat_train.lora_comfyui import WrapperLoad, emulate_load
from longcat_train.lora_config import ConvertLoraConfig, InspectLoraConfig
from longcat_train.lora_formats import (
    LoraFormatError,
    key_module,
    load_tensors,
    parse_file,
    read_file,
    resolve,
    write,
)
from longcat_train.lowrank import LowRankSet
from longcat_train.model import LongCatVideoTransformer

log = logging.getLogger(__name__)

LAYOUT_NAMES = {
    "official": "official LongCat-Video (load_lora)",
    "peft": "peft/diffusers on official module names",
    "diffsynth": "DiffSynth-Studio peft (alpha = rank)",
    "kohya": "kohya lora_unet_ on official module names (VideoX-Fun)",
    "comfyui": "ComfyUI-WanVideoWrapper module names",
}


def dit_config(model: str) -> tuple[str, DiTConfig]:
    """(a description, the config) of ``--model``: full, tiny, or a checkpoint folder's dit/config.json."""
    if model == "full":
        config, name = DiTConfig.full(), "the full LongCat-Video DiT"
    elif model == "tiny":
        config, name = DiTConfig.tiny(), "the tiny DiT"
    else:
        folder = Path(model)
        file = folder / "config.json" if (folder / "config.json").is_file() else folder / "dit/config.json"
        try:
            config = DiTConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"--model {model}: {file} is not a LongCat-Video DiT config ({err})") from None
        name = f"the DiT of {model}"
    return f"{name} ({config.depth} blocks, hidden {config.hidden_size})", config


def module_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """The weight shape of every linear and convolution of the DiT (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = LongCatVideoTransformer(config)
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv3d)
    }


def grouped(names: list[str]) -> str:
    """Module paths summarised per path inside a block: ``attn.qkv (blocks 0-47), final_layer.linear``."""
    blocks: dict[str, list[int]] = defaultdict(list)
    top: list[str] = []
    for name in names:
        block, inner = layouts.split_block(name)
        (blocks[inner].append(block) if block is not None else top.append(name))
    order = {inner: i for i, inner in enumerate(layouts.WRAPPER_BLOCK_NAMES)}
    inners = sorted(blocks, key=lambda inner: (order.get(inner, len(order)), inner))
    parts = [f"{inner} (blocks {_ranges(sorted(set(blocks[inner])))})" for inner in inners]
    return ", ".join(parts + sorted(set(top))) or "none"


def _ranges(numbers: list[int]) -> str:
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _counted(counter: Counter, unit: str) -> str:
    if len(counter) == 1:
        return f"{unit} {next(iter(counter))}"
    return f"{unit}s " + ", ".join(f"{value} ({n} modules)" for value, n in counter.most_common())


def fit_problems(lora: LowRankSet, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """One line per module of ``lora`` the model lacks or whose update has another shape."""
    problems = []
    for module, delta in lora.deltas.items():
        shape = shapes.get(module)
        if shape is None:
            problems.append(f"{module}: the model has no such module")
        elif (delta.out_features, delta.in_features) != shape:
            problems.append(
                f"{module}: update [{delta.out_features}, {delta.in_features}], weight {list(shape)}"
            )
    return problems


def wrapper_weights(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The LoRA-able weights of WanVideoWrapper's LongCat model built like ours."""
    return [
        f"diffusion_model.{name}.weight" for module in shapes for name in layouts.wrapper_names(module) or ()
    ]


@dataclass
class LoraReport:
    path: str
    layout: str
    tensors: int
    dtypes: list[str]
    lora: LowRankSet
    alpha_stated: bool
    unread: list[tuple[str, str]]
    model: str
    fit: list[str]
    wrapper: WrapperLoad
    wrapper_dropped: list[str]  # official modules whose update a WanVideoWrapper load loses


def inspect_lora(path: str | Path, model: str = "full") -> LoraReport:
    """What ``path`` holds and how it fits ``model`` and ComfyUI (LoraFormatError when it is no LoRA)."""
    tensors, metadata = load_tensors(path)
    parsed = parse_file(tensors, metadata, path)
    if parsed is None:
        sample = next(iter(tensors), "none")
        raise LoraFormatError(
            f"{path}: not a LongCat-Video LoRA in any layout this tool reads (e.g. key {sample})"
        )
    lora = resolve(parsed, path, alpha=None if not parsed.missing_alpha else "rank")
    description, config = dit_config(model)
    shapes = module_shapes(config)
    load = emulate_load(tensors, wrapper_weights(shapes))
    lost = {key_module(k) for k in load.not_loaded} - {None}
    return LoraReport(
        path=str(path),
        layout=parsed.format,
        tensors=len(tensors),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        lora=lora,
        alpha_stated=not parsed.missing_alpha,
        unread=parsed.unread,
        model=description,
        fit=fit_problems(lora, shapes),
        wrapper=load,
        wrapper_dropped=sorted(lost),
    )


def report_lines(report: LoraReport) -> list[str]:
    """The inspect report as text lines."""
    deltas = report.lora.deltas
    lines = [
        report.path,
        f"  layout: {LAYOUT_NAMES[report.layout]}; {report.tensors} tensors ({', '.join(report.dtypes)})",
        f"  modules: {len(deltas)}: {grouped(list(deltas))}",
        "  " + _counted(Counter(p.rank for d in deltas.values() for p in d.pieces), "rank"),
    ]
    if report.alpha_stated:
        alphas = Counter(
            f"{d.scale * d.rank:g} at rank {d.rank} (scale {d.scale:g})" for d in deltas.values()
        )
        lines.append("  " + _counted(alphas, "alpha"))
    else:
        lines.append(
            "  alpha: not stated (ComfyUI applies it at scale 1; convert needs --alpha A or --alpha rank)"
        )
    split: dict[int, list[str]] = defaultdict(list)
    for module, delta in deltas.items():
        if len(delta.pieces) > 1:
            split[len(delta.pieces)].append(module)
    for n, modules in sorted(split.items()):
        lines.append(f"  split into {n} row pieces (own down each): {grouped(modules)}")
    if report.fit:
        lines.append(f"  does not fit {report.model}: {len(report.fit)} modules, e.g. {report.fit[0]}")
    else:
        lines.append(f"  fits {report.model}")
    lines.extend(_wrapper_lines(report))
    if report.unread:
        key, why = report.unread[0]
        lines.append(f"  not read: {len(report.unread)} keys, e.g. {key} ({why})")
    return lines


def _wrapper_lines(report: LoraReport) -> list[str]:
    load = report.wrapper
    if not report.wrapper_dropped:
        lines = [f"  ComfyUI-WanVideoWrapper: applies all {len(report.lora.deltas)} modules"]
    else:
        kept = len(report.lora.deltas) - len(report.wrapper_dropped)
        lines = [
            f"  ComfyUI-WanVideoWrapper: applies {kept} of {len(report.lora.deltas)} modules; drops "
            f"{grouped(report.wrapper_dropped)} (longcat-lora convert {report.path} OUT --to comfyui keeps them)"
        ]
    if load.control_lora:
        lines.append(
            "  ComfyUI-WanVideoWrapper: a patch_embedding key turns on its Control-LoRA mode (input conv widened)"
        )
    if load.rs_lora:
        lines.append(
            "  ComfyUI-WanVideoWrapper: takes it for rank-stabilised peft and sets alpha = sqrt(rank)"
        )
    if load.unmerged_skipped:
        names = ", ".join(
            sorted({re.sub(r"^diffusion_model\.|\.weight$", "", k) for k in load.unmerged_skipped})
        )
        lines.append(f"  ComfyUI-WanVideoWrapper with merge_loras off (GGUF, scaled fp8) skips {names}")
    return lines


def run_inspect(cfg: InspectLoraConfig) -> list[str]:
    lines = report_lines(inspect_lora(cfg.file, cfg.model))
    for line in lines:
        print(line)
    return lines


def run_convert(cfg: ConvertLoraConfig) -> list[str]:
    """Read ``cfg.input`` (any layout), write ``cfg.output`` in ``cfg.to``; returns what was left out."""
    source, target = Path(cfg.input), Path(cfg.output)
    if target.exists() and target.resolve() == source.resolve():
        raise LoraFormatError(f"{target} is the input file; write the converted LoRA to another path")
    check_writable(target)
    lora = read_file(source, alpha=cfg.alpha)
    log.info("%s: %s, %d modules", source, LAYOUT_NAMES[lora.format], len(lora.deltas))
    log.info("writing %s in the %s layout", target, cfg.to)
    notes = write(lora, target, cfg.to)
    print(f"wrote {target} ({cfg.to}, {len(lora.deltas) - len(notes)} modules)")
    return notes
