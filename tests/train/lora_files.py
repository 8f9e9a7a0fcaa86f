"""LoRAs for the LoRA-format tests: random LowRankSets on the tiny DiT, and files built the way other
projects write them (each builder cites the code it follows)."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn

from longcat_train.loading import tiny_dit
from longcat_train.lowrank import LowRankDelta, LowRankPiece, LowRankSet

# The official split files' row pieces per module (LongCat-Video lora_utils.py: n_seperate).
SPLITS = {
    "attn.qkv": 3,
    "cross_attn.kv_linear": 2,
    "adaLN_modulation.1": 6,
    "final_layer.adaLN_modulation.1": 2,
}


def linears(model: nn.Module | None = None) -> dict[str, nn.Linear]:
    model = model or tiny_dit()
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def random_lora(*, rank: int = 4, split: bool = True, seed: int = 0, scale: float = 0.75) -> LowRankSet:
    """A LoRA on every linear of the tiny DiT; ``split``: the official modules in their row pieces, each
    with its own down (what the official refinement LoRA holds). Scales differ per module."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, (name, layer) in enumerate(linears().items()):
        inner = name.split(".", 2)[2] if name.startswith("blocks.") else name
        n = SPLITS.get(inner, 1) if split else 1
        rows = layer.out_features // n
        pieces = tuple(
            LowRankPiece(
                torch.randn(rank, layer.in_features, generator=g), torch.randn(rows, rank, generator=g)
            )
            for _ in range(n)
        )
        deltas[name] = LowRankDelta(pieces, scale * (1 + i % 3) / 2)
    return LowRankSet(deltas, "test")


def peft_injected(targets: list[str], rank: int, alpha: float, seed: int = 3) -> nn.Module:
    """The tiny DiT with a peft adapter injected the way VideoX-Fun and DiffSynth-Studio do
    (``inject_adapter_in_model(LoraConfig(r, lora_alpha, target_modules))``), trained to random values."""
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), tiny_dit())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``get_peft_model_state_dict``: ``blocks.0.attn.qkv.lora_A.weight``, what VideoX-Fun saves
    (scripts/longcatvideo/train_lora.py:1773-1776)."""
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def videox_fun_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VideoX-Fun's ``convert_peft_lora_to_kohya_lora`` (videox_fun/utils/lora_utils.py:390-407): its
    ``-compatible_with_comfyui`` file, no alpha."""
    out = {}
    for key, value in state.items():
        key = key.replace("diffusion_model.", "")
        if "lora_unet__" not in key:
            key = "lora_unet__" + key
        for old, new in ((".lora_A.default.", ".lora_down."), (".lora_B.default.", ".lora_up.")):
            key = key.replace(old, new)
        key = key.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.").replace(".", "_")
        if key.endswith("_lora_up_weight"):
            key = key[:-15] + ".lora_up.weight"
        if key.endswith("_lora_down_weight"):
            key = key[:-17] + ".lora_down.weight"
        out[key] = value
    return out


def simpletuner_comfyui(state: dict[str, torch.Tensor], adapter_metadata: dict) -> dict[str, torch.Tensor]:
    """SimpleTuner's ``convert_diffusers_to_comfyui`` (simpletuner/helpers/training/lora_format.py:333-375)
    with its alpha rule (``_resolve_alpha_for_module``, :218-238) on a ``transformer.`` state dict."""
    converted, alphas = {}, {}
    for key, weight in state.items():
        new_key = (
            key.replace("transformer.", "diffusion_model.", 1) if key.startswith("transformer.") else key
        )
        if ".lora_A." in new_key:
            module = new_key[: new_key.rfind(".lora_A.")]
            inner = module.removeprefix("diffusion_model.")
            alpha = (adapter_metadata.get("alpha_pattern") or {}).get(
                inner, adapter_metadata.get("lora_alpha")
            )
            alphas.setdefault(module, torch.tensor(float(alpha), dtype=torch.float32))
        converted[new_key] = weight
    converted.update({f"{module}.alpha": alpha for module, alpha in alphas.items()})
    return converted


def simpletuner_header(adapter_metadata: dict) -> dict[str, str]:
    """SimpleTuner's ComfyUI save header (helpers/models/common.py:2103-2106, ``_serialize_lora_adapter_metadata``)."""
    return {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_metadata, indent=2, sort_keys=True)}


def videox_fun_network(lora: LowRankSet, alpha: float) -> dict[str, torch.Tensor]:
    """VideoX-Fun's own ``LoRANetwork`` state dict: ``"lora_unet" + "." + "" + "." + path`` with ``.`` -> ``_``
    (videox_fun/utils/lora_utils.py:229-230), ``lora_down``/``lora_up`` and the ``alpha`` buffer (:66-70)."""
    out = {}
    for module, delta in lora.deltas.items():
        name = ("lora_unet" + "." + "" + "." + module).replace(".", "_")
        (piece,) = delta.pieces
        out[f"{name}.lora_down.weight"] = piece.down
        out[f"{name}.lora_up.weight"] = piece.up
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def official_state(lora: LowRankSet) -> dict[str, torch.Tensor]:
    """The state dict of the official ``LoRANetwork`` (LongCat-Video modules/lora_utils.py:49-64, 83-84,
    145): module ``lora___lorahyphen___<path with ___lorahyphen___>``, ``lora_down`` [n*r, in], ``lora_up``
    or ``lora_up.blocks.{i}``, ``alpha_scale``."""
    out = {}
    for module, delta in lora.deltas.items():
        name = "lora" + "___lorahyphen___" + module.replace(".", "___lorahyphen___")
        out[f"{name}.lora_down.weight"] = torch.cat([p.down for p in delta.pieces])
        if len(delta.pieces) == 1:
            out[f"{name}.lora_up.weight"] = delta.pieces[0].up
        else:
            out.update({f"{name}.lora_up.blocks.{i}.weight": p.up for i, p in enumerate(delta.pieces)})
        out[f"{name}.alpha_scale"] = torch.tensor(delta.scale)
    return out
