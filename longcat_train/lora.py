"""The LoRA that trains (peft on the DiT linears) and the two files it is saved as (reading any LoRA
file: ``longcat_train.lora_formats``; applying frozen ones: ``longcat_train.lora_apply``).

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

"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from longcat_data.files import replace_atomic
from longcat_train.config import ConfigError
from longcat_train.lora_apply import load_loras
from longcat_train.lora_formats import DIFFUSERS_PREFIX, METADATA_KEY, from_peft_weights, write
from longcat_train.lora_pieces import one_piece
from longcat_train.lowrank import LowRankSet

__all__ = ["load_loras"]  # the Python API for frozen LoRAs, several at once (longcat_train.lora_apply)

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
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
    tensors = {DIFFUSERS_PREFIX + k: v.detach().cpu().contiguous() for k, v in weights.items()}
    path = Path(path)
    replace_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def save_official(weights: dict[str, torch.Tensor], path: str | Path, settings: dict) -> Path:
    """``lora_longcat.safetensors`` for the official ``load_lora(path, key, lora_network_dim=r)``."""
    write(from_peft_weights(weights, settings), path, "official")
    return Path(path)


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
            delta = one_piece(delta)  # a block-diagonal split is the same update as one pair
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
