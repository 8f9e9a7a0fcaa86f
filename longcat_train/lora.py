"""The LoRA that trains (peft on the DiT linears), the two files it is saved as, and reading any LoRA
file into a :class:`~longcat_train.lowrank.LowRankSet` (applying those: ``longcat_train.lora_apply``).

In memory the trained adapter is a peft ``PeftModel`` (so ``model.disable_adapter()`` gives the base
model back). On disk and between functions here, its weights use one *canonical* naming, the module path
plus peft's matrix names: ``blocks.0.attn.qkv.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r];
the layer adds ``lora_B(lora_A(x)) * alpha / r``.

- ``lora.safetensors``: diffusers/peft layout, keys prefixed ``transformer.``, the adapter config in the
  ``lora_adapter_metadata`` header entry (as diffusers writes it).
- ``lora_longcat.safetensors``: the official LongCat-Video format read by
  ``LongCatVideoTransformer3DModel.load_lora``: module path with ``.`` -> ``___lorahyphen___``, prefixed
  ``lora___lorahyphen___``; ``.lora_down.weight`` (= lora_A), ``.lora_up.weight`` (= lora_B) and a
  scalar ``.alpha_scale`` (= alpha / r). The official loader takes the rank as ``lora_network_dim``.

:func:`read_lora_file` reads those, peft's ``adapter_model.safetensors``, DiffSynth's files and the
official ones whose modules are split in row blocks (``lora_up.blocks.{i}``); :data:`LORA_FORMATS` lists
the layouts it knows.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from longcat_train.config import ConfigError
from longcat_train.lowrank import LowRankDelta, LowRankPiece, LowRankSet

log = logging.getLogger(__name__)

DIFFUSERS_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
OFFICIAL_PREFIX = "lora___lorahyphen___"
OFFICIAL_HYPHEN = "___lorahyphen___"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry for the adapter config
ADAPTER = "default"

# Wrappers that prefix parameter names: DDP, torch.compile, peft's model and its adapter name.
_WRAPPER_PARTS = re.compile(
    rf"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module)\.|^{re.escape(PEFT_PREFIX)}"
)


def matching_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Linear layers whose name equals a target or ends with ``.target`` (peft's rule)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    }


def check_targets(model: nn.Module, targets: list[str], rank: int) -> dict[str, nn.Linear]:
    """The targeted linears, or ConfigError naming each target (or rank) that matches no layer."""
    found = matching_linears(model, targets)
    dead = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in found)]
    if dead:
        linears = (n for n, m in model.named_modules() if isinstance(m, nn.Linear))
        examples = sorted({re.sub(r"^blocks\.\d+\.", "", n) for n in linears})[:12]
        raise ConfigError(
            f"lora_targets {', '.join(dead)} match no Linear layer of the model; "
            f"linear names look like: {', '.join(examples)}"
        )
    if rank < 1:
        raise ConfigError(f"lora_rank {rank} must be at least 1")
    narrowest = min(found, key=lambda n: min(found[n].in_features, found[n].out_features))
    width = min(found[narrowest].in_features, found[narrowest].out_features)
    if rank > width:
        raise ConfigError(
            f"lora_rank {rank} exceeds the narrowest targeted layer ({narrowest}: {width} features)"
        )
    return found


def apply_lora(
    model: nn.Module, *, rank: int = 8, alpha: float | None = None, dropout: float = 0.0, targets: list[str]
) -> PeftModel:
    """Freeze ``model`` and wrap it with a trainable LoRA adapter (fp32 weights, whatever the base dtype).
    One LoRA trains at a time: a model that carries one already is refused."""
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ConfigError(
            "the model already carries a LoRA adapter that trains; one LoRA trains at a time: apply the "
            "others frozen (longcat_train.lora_apply.load_loras: base_lora, validation_lora)"
        )
    found = check_targets(model, targets, rank)
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=list(targets))
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info(
        "LoRA rank %d alpha %g on %d linears: %.2fM trainable parameters",
        rank,
        alpha or rank,
        len(found),
        trainable / 1e6,
    )
    return peft_model


def canonical_name(name: str) -> str:
    """``module.base_model.model.blocks.0.attn.qkv.lora_A.default.weight`` -> ``blocks.0.attn.qkv.lora_A.weight``."""
    name = _WRAPPER_PARTS.sub(r"\1", name)
    name = _WRAPPER_PARTS.sub(r"\1", name)  # DDP's prefix may sit in front of peft's
    return name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")


def lora_weights(state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical LoRA weights from a (possibly wrapped) model or from a full state dict of one."""
    items = state.named_parameters() if isinstance(state, nn.Module) else state.items()
    return {canonical_name(k): v.detach() for k, v in items if ".lora_A." in k or ".lora_B." in k}


def adapter_settings(model: PeftModel) -> dict:
    config = model.peft_config[ADAPTER]
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
    }


# ---------------------------------------------------------------- files


def save_diffusers(weights: dict[str, torch.Tensor], path: str | Path, settings: dict) -> Path:
    """``lora.safetensors`` in the diffusers layout; ``settings`` = rank/alpha/targets (adapter_settings)."""
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{DIFFUSERS_PREFIX}{k}": v for k, v in settings.items()}),
    }
    tensors = {DIFFUSERS_PREFIX + k: v.contiguous() for k, v in weights.items()}
    return _save(tensors, path, metadata)


def save_official(weights: dict[str, torch.Tensor], path: str | Path, settings: dict) -> Path:
    """``lora_longcat.safetensors`` for the official ``load_lora(path, key, lora_network_dim=r)``."""
    scale = torch.tensor(settings["lora_alpha"] / settings["r"], dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        module, matrix = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        name = OFFICIAL_PREFIX + module.replace(".", OFFICIAL_HYPHEN)
        tensors[f"{name}.{'lora_down' if matrix == 'lora_A' else 'lora_up'}.weight"] = value.contiguous()
        tensors[f"{name}.alpha_scale"] = scale.clone()
    metadata = {
        "format": "pt",
        "lora_network_dim": str(settings["r"]),
        "lora_network_alpha": str(settings["lora_alpha"]),
    }
    return _save(tensors, path, metadata)


def _save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- reading any LoRA file


# Tensor names: peft's after canonical_name (ours, diffusers, peft, DiffSynth); official as written.
_CANONICAL_KEY = re.compile(r"\.lora_[AB]\.weight$")
_OFFICIAL_KEY = re.compile(
    rf"({re.escape(OFFICIAL_PREFIX)}.+?)\.(lora_down\.weight|lora_up\.weight|lora_up\.blocks\.\d+\.weight|alpha_scale)"
)


@dataclass(frozen=True)
class LoraFormat:
    """A layout of LoRA files: the tensor names it uses, and how its tensors become a LowRankSet.

    Attributes:
        name: what the format is called in messages (``LowRankSet.format``).
        knows: whether a tensor name is one this format writes; a file is in the format when it knows
            every name (checked from the header alone).
        read: ``(tensors, header metadata, the file) -> LowRankSet``; ValueError naming the file and the
            module for a file it cannot read.
    """

    name: str
    knows: Callable[[str], bool]
    read: Callable[[dict[str, torch.Tensor], dict[str, str], Path], LowRankSet]


def _official_module(name: str) -> str:
    return name.removeprefix(OFFICIAL_PREFIX).replace(OFFICIAL_HYPHEN, ".")


def _read_official(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> LowRankSet:
    """The official layout: ``lora_down`` ``[n*r, in]``; ``lora_up`` ``[out, r]`` or, for a module whose
    output the official loader splits in n (``n_seperate``), ``lora_up.blocks.{i}`` ``[out/n, r]``, row
    block i computed from down rows ``i*r:(i+1)*r`` (block-diagonal); a scalar ``alpha_scale``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, part = _OFFICIAL_KEY.fullmatch(key).group(1, 2)
        parts.setdefault(name, {})[part] = value
    deltas: dict[str, LowRankDelta] = {}
    for name, found in sorted(parts.items()):
        down = found.get("lora_down.weight")
        blocks = {int(k.split(".")[2]): v for k, v in found.items() if k.startswith("lora_up.blocks.")}
        ups = [found["lora_up.weight"]] if "lora_up.weight" in found else []
        if down is None:
            raise ValueError(f"{path}: {name} has no lora_down weights")
        if not ups and not blocks:
            raise ValueError(f"{path}: {name} has lora_down but no lora_up weights")
        if ups and blocks:
            raise ValueError(f"{path}: {name} has both lora_up.weight and lora_up.blocks: one or the other")
        if blocks and sorted(blocks) != list(range(len(blocks))):
            raise ValueError(
                f"{path}: {name} has lora_up.blocks {sorted(blocks)}; 0 to n-1 must all be there"
            )
        if "alpha_scale" not in found or found["alpha_scale"].numel() != 1:
            raise ValueError(f"{path}: {name} has no scalar alpha_scale (alpha / rank), as official files do")
        ups = ups or [blocks[i] for i in range(len(blocks))]
        rank = ups[0].shape[1]
        if down.shape[0] != rank * len(ups):
            raise ValueError(
                f"{path}: {name}: lora_down is {tuple(down.shape)} for {len(ups)} lora_up of rank {rank}; "
                f"it must have {rank * len(ups)} rows"
            )
        pieces = tuple(LowRankPiece(d, u) for d, u in zip(down.split(rank), ups, strict=True))
        try:
            deltas[_official_module(name)] = LowRankDelta(pieces, found["alpha_scale"].float().item())
        except ValueError as err:
            raise ValueError(f"{path}: {name}: {err}") from None
    return LowRankSet(deltas, "official", metadata)


def _peft_settings(metadata: dict[str, str], path: Path) -> dict:
    """The adapter config of a peft-style file: diffusers' header entry, else peft's
    ``adapter_config.json`` beside the file; {} when neither says (alpha = rank)."""
    beside = path.with_name("adapter_config.json")
    where, text = (path, metadata[METADATA_KEY]) if METADATA_KEY in metadata else (beside, None)
    try:
        if text is not None:
            return {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in json.loads(text).items()}
        return json.loads(beside.read_text()) if beside.is_file() else {}
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{where}: its adapter config is not a JSON object ({err})") from None


def _peft_scale(module: str, rank: int, settings: dict) -> float:
    """alpha / rank (or / sqrt(rank) for rsLoRA), alpha as peft picks it: the longest ``alpha_pattern``
    matching the module's path, else ``lora_alpha``, else the rank."""
    patterns = [p for p in settings.get("alpha_pattern") or {} if re.fullmatch(rf"(.*\.)?({p})", module)]
    alpha = settings["alpha_pattern"][max(patterns, key=len)] if patterns else settings.get("lora_alpha")
    alpha = float(rank if alpha is None else alpha)
    return alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank


def _read_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> LowRankSet:
    """Ours, diffusers, peft and DiffSynth: ``<module>.lora_A.weight`` ``[r, in]`` and ``lora_B``
    ``[out, r]`` under any wrapper prefix, scale alpha / r from the adapter config."""
    weights = {canonical_name(k.removeprefix(DIFFUSERS_PREFIX)): v for k, v in tensors.items()}
    settings = _peft_settings(metadata, path)
    deltas: dict[str, LowRankDelta] = {}
    for module in sorted({k.rsplit(".", 2)[0] for k in weights}):
        down, up = weights.get(f"{module}.lora_A.weight"), weights.get(f"{module}.lora_B.weight")
        if down is None or up is None:
            has, lacks = ("lora_A", "lora_B") if up is None else ("lora_B", "lora_A")
            raise ValueError(f"{path}: {module} has {has} but no {lacks} weights")
        if up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{path}: {module}: lora_A shape {tuple(down.shape)} and lora_B shape {tuple(up.shape)} "
                "do not fit together (their ranks differ)"
            )
        deltas[module] = LowRankDelta((LowRankPiece(down, up),), _peft_scale(module, down.shape[0], settings))
    return LowRankSet(deltas, "peft", metadata)


# The layouts read_lora_file knows, tried in order: a file is read by the first that knows all its
# tensor names. Other layouts (kohya, ComfyUI, ...) are one LoraFormat each, added here.
LORA_FORMATS: tuple[LoraFormat, ...] = (
    LoraFormat("official", lambda key: bool(_OFFICIAL_KEY.fullmatch(key)), _read_official),
    LoraFormat(
        "peft",
        lambda key: bool(_CANONICAL_KEY.search(canonical_name(key.removeprefix(DIFFUSERS_PREFIX)))),
        _read_peft,
    ),
)


def check_lora_file(path: str | Path) -> LoraFormat:
    """The format of the LoRA file at ``path``, or ValueError (one line naming the file) unless it is a
    safetensors file of LoRA weights in a format of :data:`LORA_FORMATS`. Reads the header alone, so a
    command can refuse a wrong file before any model loads."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            flat = [k for k in keys if k.endswith("weight") and len(f.get_slice(k).get_shape()) != 2]
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path}: not a safetensors file; LoRAs are read from .safetensors only "
            "(convert a .ckpt or .bin with safetensors.torch.save_file)"
        ) from err
    if not keys:
        raise ValueError(f"{path}: holds no tensors, so no LoRA weights")
    # The format that knows most of the names reads the file, or names the first it does not know.
    known = [[k for k in keys if fmt.knows(k)] for fmt in LORA_FORMATS]
    best = max(range(len(LORA_FORMATS)), key=lambda i: len(known[i]))
    if len(known[best]) < len(keys):
        unexpected = next(k for k in keys if k not in set(known[best]))
        raise ValueError(f"{path}: not a LoRA file (unexpected key {unexpected})")
    if flat:
        raise ValueError(f"{path}: not a LoRA file ({flat[0]} is not a matrix)")
    return LORA_FORMATS[best]


def read_lora_file(path: str | Path) -> LowRankSet:
    """Any LoRA file (a format of :data:`LORA_FORMATS`) as a LowRankSet on the CPU, in the file's dtype;
    ValueError naming the file for one that is not a LoRA, is incomplete or holds non-finite values."""
    fmt = check_lora_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lora_set = fmt.read(tensors, metadata, Path(path))
    for module, delta in lora_set.deltas.items():
        finite = math.isfinite(delta.scale) and all(
            bool(torch.isfinite(t).all()) for p in delta.pieces for t in (p.down, p.up)
        )
        if not finite:
            raise ValueError(f"{path}: the LoRA of {module} holds values that are not finite (NaN or inf)")
    return lora_set


# ---------------------------------------------------------------- into the trained adapter (resume)


def load_lora_weights(model: PeftModel, lora_set: LowRankSet) -> None:
    """Copy a LoRA into the trained adapter: the same modules, shapes and one piece each (a file this
    adapter was saved as); rescaled where its scale differs from the adapter's, else copied exactly."""
    own = adapter_settings(model)
    own_scale = own["lora_alpha"] / own["r"]
    params = {canonical_name(k): p for k, p in model.named_parameters() if ".lora_A." in k or ".lora_B." in k}
    modules = {k.rsplit(".", 2)[0] for k in params}
    missing, unexpected = sorted(modules - set(lora_set.deltas)), sorted(set(lora_set.deltas) - modules)
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights do not fit the adapter: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for module, delta in lora_set.deltas.items():
            if len(delta.pieces) != 1:
                raise ValueError(f"LoRA {module} is split in {len(delta.pieces)} blocks; the adapter has one")
            rescale = delta.scale / own_scale
            for matrix, value in (("lora_A", delta.pieces[0].down), ("lora_B", delta.pieces[0].up)):
                param = params[f"{module}.{matrix}.weight"]
                if value.shape != param.shape:
                    raise ValueError(
                        f"LoRA {module}.{matrix}: file has shape {tuple(value.shape)}, adapter {tuple(param.shape)}"
                    )
                if rescale != 1.0 and matrix == "lora_B":
                    value = value.float() * rescale
                param.copy_(value.to(param.dtype))
