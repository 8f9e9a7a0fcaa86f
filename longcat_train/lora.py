"""LoRA on the DiT linears with peft, and the two files a trained adapter is saved as.

In memory the adapter is a peft ``PeftModel`` (so ``model.disable_adapter()`` gives the base model back).
On disk and between functions here, weights use one *canonical* naming, the module path plus peft's
matrix names: ``blocks.0.attn.qkv.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]; the layer
adds ``lora_B(lora_A(x)) * alpha / r``.

- ``lora.safetensors``: diffusers/peft layout, keys prefixed ``transformer.``, the adapter config in the
  ``lora_adapter_metadata`` header entry (as diffusers writes it).
- ``lora_longcat.safetensors``: the official LongCat-Video format read by
  ``LongCatVideoTransformer3DModel.load_lora``: module path with ``.`` -> ``___lorahyphen___``, prefixed
  ``lora___lorahyphen___``; ``.lora_down.weight`` (= lora_A), ``.lora_up.weight`` (= lora_B) and a
  scalar ``.alpha_scale`` (= alpha / r). The official loader takes the rank as ``lora_network_dim``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from longcat_train.config import ConfigError

log = logging.getLogger(__name__)

DIFFUSERS_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
OFFICIAL_PREFIX = "lora___lorahyphen___"
OFFICIAL_HYPHEN = "___lorahyphen___"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry for the adapter config
ADAPTER = "default"

# The keys a LoRA file holds, after canonical_name (ours, diffusers, peft) or as written (official).
_CANONICAL_KEY = re.compile(r"\.lora_[AB]\.weight$")
_OFFICIAL_KEY = re.compile(r"\.(lora_down\.weight|lora_up\.weight|lora_up\.blocks\.\d+\.weight|alpha_scale)$")

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
    """Freeze ``model`` and wrap it with a trainable LoRA adapter (fp32 weights, whatever the base dtype)."""
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


def check_lora_file(path: str | Path) -> None:
    """Raise ValueError (one line naming the file) unless ``path`` is a safetensors file of LoRA
    weights in either format. Reads the header alone, so a command can refuse a wrong file before any
    model loads."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            flat = [
                k for k in keys if not k.endswith(".alpha_scale") and len(f.get_slice(k).get_shape()) != 2
            ]
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path}: not a safetensors file; LoRAs are read from .safetensors only "
            "(convert a .ckpt or .bin with safetensors.torch.save_file)"
        ) from err
    if not keys:
        raise ValueError(f"{path}: holds no tensors, so no LoRA weights")
    if any(k.startswith(OFFICIAL_PREFIX) for k in keys):
        bad = [k for k in keys if not _OFFICIAL_KEY.search(k)]
    else:
        bad = [k for k in keys if not _CANONICAL_KEY.search(canonical_name(k.removeprefix(DIFFUSERS_PREFIX)))]
    if bad:
        raise ValueError(f"{path}: not a LoRA file (unexpected key {bad[0]})")
    if flat:
        raise ValueError(f"{path}: not a LoRA file ({flat[0]} is not a matrix)")


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Canonical weights and {r, lora_alpha, target_modules} from either file format (or a peft
    ``adapter_model.safetensors``). Official per-module ``alpha_scale`` is folded into lora_B, so the
    returned weights apply with scale alpha / r."""
    check_lora_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}
    if any(k.startswith(OFFICIAL_PREFIX) for k in raw):
        return _from_official(raw, path)
    weights = {canonical_name(k.removeprefix(DIFFUSERS_PREFIX)): v for k, v in raw.items()}
    ranks = [v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight")]
    if not ranks:
        raise ValueError(f"{path}: no lora_A weights, so not a whole LoRA")
    settings = {"r": ranks[0], "lora_alpha": float(ranks[0])}
    if METADATA_KEY in metadata:
        stored = json.loads(metadata[METADATA_KEY])
        settings.update({k.removeprefix(DIFFUSERS_PREFIX): v for k, v in stored.items()})
    settings.setdefault("target_modules", sorted({k.rsplit(".", 2)[0] for k in weights}))
    return weights, settings


def _from_official(raw: dict[str, torch.Tensor], path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    if any(".lora_up.blocks." in k for k in raw):
        raise ValueError(f"{path}: official LoRA with split lora_up blocks (n_seperate > 1) is not supported")
    weights: dict[str, torch.Tensor] = {}
    ranks = set()
    for key, value in raw.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        if f"{name}.lora_up.weight" not in raw:
            raise ValueError(f"{path}: {name} has lora_down but no lora_up weights")
        module = name.removeprefix(OFFICIAL_PREFIX).replace(OFFICIAL_HYPHEN, ".")
        scale = raw[f"{name}.alpha_scale"].float() if f"{name}.alpha_scale" in raw else torch.tensor(1.0)
        weights[f"{module}.lora_A.weight"] = value
        weights[f"{module}.lora_B.weight"] = (raw[f"{name}.lora_up.weight"].float() * scale).to(value.dtype)
        ranks.add(value.shape[0])
    if not ranks:
        raise ValueError(f"{path}: no lora_down weights, so not a whole LoRA")
    if len(ranks) != 1:
        raise ValueError(f"{path}: LoRA modules have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    # alpha_scale is folded into lora_B above, so the adapter applies it with alpha = rank (scale 1).
    return weights, {
        "r": rank,
        "lora_alpha": float(rank),
        "target_modules": sorted({k.rsplit(".", 2)[0] for k in weights}),
    }


def load_lora(model: nn.Module, path: str | Path) -> PeftModel:
    """Load either LoRA file into ``model``: a base DiT gets a new adapter shaped by the file; a model
    that already carries an adapter (e.g. on resume) gets its weights replaced, rescaled if its alpha
    differs from the file's."""
    weights, settings = read_lora(path)
    if not isinstance(model, PeftModel):
        model = apply_lora(
            model,
            rank=settings["r"],
            alpha=settings["lora_alpha"],
            dropout=settings.get("lora_dropout", 0.0),
            targets=list(settings["target_modules"]),
        )
    load_lora_weights(model, weights, settings)
    return model


def load_lora_weights(
    model: PeftModel, weights: dict[str, torch.Tensor], settings: dict | None = None
) -> None:
    """Copy canonical weights into the adapter; every adapter matrix must be given, with its shape."""
    own = adapter_settings(model)
    rescale = 1.0
    if settings is not None:
        rescale = (settings["lora_alpha"] / settings["r"]) / (own["lora_alpha"] / own["r"])
    params = {canonical_name(k): p for k, p in model.named_parameters() if ".lora_A." in k or ".lora_B." in k}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights do not fit the adapter: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for key, param in params.items():
            value = weights[key]
            if value.shape != param.shape:
                raise ValueError(
                    f"LoRA {key}: file has shape {tuple(value.shape)}, adapter {tuple(param.shape)}"
                )
            if rescale != 1.0 and ".lora_B." in key:
                value = value.float() * rescale
            param.copy_(value.to(param.dtype))
