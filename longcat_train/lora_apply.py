"""Frozen LoRAs on a DiT, several at once, each at its strength: merged into the weights or as adapters.

Each LoRA (a file, or a :class:`~longcat_train.lowrank.LowRankSet` any reader made) adds to a linear's
output ``strength * scale * cat_i(up_i @ down_i @ x)``, which is what the official
``load_lora`` + ``enable_loras`` forward adds, and acts on every ``nn.Linear`` of the model the official
loader accepts: the block linears, adaLN modulations, the final layer, the timestep and caption MLPs.
Two ways to apply them:

- ``merge=True``: the sum of the updates is added to the weights in fp32 and rounded once to the
  weights' dtype; no cost per step. :meth:`LoadedLoras.remove` subtracts the same fp32 sum, computed
  again from the low-rank pieces (no copy of the weights is kept): each weight comes back within one
  rounding step of its dtype. Refused for quantised or sharded weights, which cannot take the sum.
- ``merge=False``: a forward hook on each targeted linear adds the updates to its output (per LoRA:
  down, then the up blocks, then the scale, as the official forward). The tensors live on one device in
  the dtype the layer computes in: fp32 on the layers the model runs in fp32 (``model.FP32Linear``, the
  official fp32-autocast region), the model's compute dtype elsewhere. They are neither parameters nor
  buffers, so they never train, are not in state dicts or checkpoints, and block swap, FSDP and
  quantisation leave them alone; removal is exact. Hooks rather than more peft adapters: peft's
  adapters would be parameters of the model beside the one that trains (made trainable again by
  ``set_adapter``, saved with it, sharded and synchronised), and would store the split modules' block
  diagonal with its zeros.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from longcat_train.lora_formats import read_file
from longcat_train.lowrank import LowRankDelta, LowRankPiece, LowRankSet
from longcat_train.model import FP32Linear, transformer_of

log = logging.getLogger(__name__)

LoraSource = str | Path | LowRankSet
_MERGEABLE = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LISTED = 8  # modules a refusal names before "and N more"


@dataclass(frozen=True)
class NamedLora:
    """A LoRA to apply: how messages name it, its update, its strength."""

    name: str
    lora: LowRankSet
    strength: float


def named_loras(loras: Sequence[tuple[LoraSource, float] | NamedLora]) -> list[NamedLora]:
    """Files read (``lora_formats.read_file``), sets named by their place in the list, NamedLoras kept;
    ValueError for a strength that is not finite."""
    named = []
    for i, item in enumerate(loras):
        if isinstance(item, NamedLora):
            name, source, strength = item.name, item.lora, item.strength
        else:
            source, strength = item
            name = f"#{i + 1} ({source.format})" if isinstance(source, LowRankSet) else str(source)
        if not math.isfinite(strength):
            raise ValueError(f"LoRA {name}: strength {strength} is not a finite number")
        lora_set = source if isinstance(source, LowRankSet) else read_file(source)
        named.append(NamedLora(name, lora_set, float(strength)))
    return named


def _linear_of(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` computing ``module``: itself, or the base layer under peft's LoRA layers."""
    while not isinstance(module, nn.Linear) and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module if isinstance(module, nn.Linear) else None


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def lora_targets(model: nn.Module, lora: NamedLora) -> dict[str, nn.Linear]:
    """Module path -> the linear each update of ``lora`` acts on; ValueError (one line) naming the modules
    the DiT does not have as linears, or the first whose shape differs from the LoRA's."""
    transformer = transformer_of(model)
    targets: dict[str, nn.Linear] = {}
    unknown = []
    for module in lora.lora.deltas:
        try:
            linear = _linear_of(transformer.get_submodule(module))
        except AttributeError:
            linear = None
        if linear is None:
            unknown.append(module)
        else:
            targets[module] = linear
    if unknown:
        raise ValueError(
            f"LoRA {lora.name}: {len(unknown)} of its modules match no Linear layer of the DiT: "
            f"{_listed(unknown)} (a LoRA for another model?)"
        )
    for module, linear in targets.items():
        delta = lora.lora.deltas[module]
        if (delta.out_features, delta.in_features) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"LoRA {lora.name}: {module} is [{delta.out_features}, {delta.in_features}] in the LoRA but "
                f"[{linear.out_features}, {linear.in_features}] in the DiT (a LoRA for another model?)"
            )
    return targets


def _moved(delta: LowRankDelta, device: torch.device, dtype: torch.dtype) -> LowRankDelta:
    pieces = tuple(LowRankPiece(p.down.to(device, dtype), p.up.to(device, dtype)) for p in delta.pieces)
    return LowRankDelta(pieces, delta.scale)


class _Update:
    """One LoRA's update of one linear, on the device and in the dtype it computes in."""

    def __init__(
        self, delta: LowRankDelta, strength: float, device: torch.device, dtype: torch.dtype
    ) -> None:
        delta = _moved(delta, device, dtype)
        self.down = torch.cat([p.down for p in delta.pieces])  # [sum of ranks, in]
        self.ups = [p.up for p in delta.pieces]
        self.ranks = [p.rank for p in delta.pieces]
        self.scale = delta.scale * strength

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x.to(self.down.dtype), self.down)
        if len(self.ups) == 1:
            return F.linear(hidden, self.ups[0]) * self.scale
        parts = hidden.split(self.ranks, dim=-1)  # row block i is up_i of down_i's output
        return (
            torch.cat([F.linear(h, up) for h, up in zip(parts, self.ups, strict=True)], dim=-1) * self.scale
        )


class _UpdateHook:
    """A forward hook adding the updates of several LoRAs to a linear's output (their sum, then once)."""

    def __init__(self, updates: list[_Update]) -> None:
        self.updates = updates
        self.enabled = True

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled:
            return None
        total = sum(update(args[0]) for update in self.updates)
        return output + total.to(output.dtype)


class LoadedLoras:
    """LoRAs :func:`load_loras` applied to a DiT. :meth:`remove` takes them off again."""

    def __init__(
        self,
        loras: list[NamedLora],
        targets: dict[nn.Linear, list[tuple[LowRankDelta, float]]],
        *,
        merged: bool,
        device: torch.device | None,
    ) -> None:
        self.loras, self.merged = loras, merged
        self._targets, self._device = targets, device
        self._hooks: list[tuple[_UpdateHook, RemovableHandle]] = []

    @property
    def names(self) -> list[str]:
        return [lora.name for lora in self.loras]

    @property
    def enabled(self) -> bool:
        """Whether the hooked updates act (merged ones always do). Off, they cost one check per layer:
        the trainer keeps its validation LoRAs hooked and on only while it samples."""
        return all(hook.enabled for hook, _ in self._hooks)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if self.merged:
            raise ValueError("merged LoRAs are part of the weights: remove() them instead")
        for hook, _ in self._hooks:
            hook.enabled = value

    def _add(self, sign: float) -> None:
        with torch.no_grad():
            for linear, terms in self._targets.items():
                weight = linear.weight
                device = self._device or weight.device
                total = sum(strength * _moved(d, device, torch.float32).weight() for d, strength in terms)
                weight.copy_(weight.detach().to(device, torch.float32) + sign * total)

    def _hook(self, dtype: torch.dtype, device: torch.device) -> None:
        for linear, terms in self._targets.items():
            compute = torch.float32 if isinstance(linear, FP32Linear) else dtype
            hook = _UpdateHook([_Update(delta, strength, device, compute) for delta, strength in terms])
            self._hooks.append((hook, linear.register_forward_hook(hook)))

    def remove(self) -> None:
        """Take the LoRAs off: hooks exactly, merged ones by subtracting their fp32 sum (module doc)."""
        if self.merged:
            self._add(-1.0)
        for _, handle in self._hooks:
            handle.remove()
        self._targets, self._hooks = {}, []
        log.info("LoRA removed: %s", ", ".join(self.names) or "none")


def _unmergeable(linear: nn.Linear) -> str | None:
    weight = linear.weight
    if type(weight.data) is not torch.Tensor or weight.dtype not in _MERGEABLE:
        return f"{type(weight.data).__name__} of {weight.dtype}"
    return None


def load_loras(
    model: nn.Module,
    loras: Sequence[tuple[LoraSource, float] | NamedLora],
    *,
    merge: bool,
    device: torch.device | str | None = None,
) -> LoadedLoras:
    """Apply frozen LoRAs to ``model`` (the DiT, bare or under peft, DDP, FSDP, torch.compile), each
    ``(file or LowRankSet, strength)``; the updates add up, so the order does not matter (to rounding).

    Args:
        merge: add them to the weights (nothing trains: no cost per step) or hook them on as adapters
            (the weights stay as they are: quantised, sharded, or under a LoRA that trains).
        device: where the updates are computed: merged, each weight's own device when None; hooked, the
            device of the model's input layer when None (the compute device under block swap).

    Nothing changes when any LoRA is refused (ValueError, one line naming it): a file that is not a LoRA,
    a strength that is not finite, modules the DiT does not have as linears, another model's shapes,
    and, to merge, weights that are quantised or sharded.
    """
    named = named_loras(loras)
    targets: dict[nn.Linear, list[tuple[LowRankDelta, float]]] = {}
    paths: dict[nn.Linear, str] = {}
    for lora in named:
        for module, linear in lora_targets(model, lora).items():
            targets.setdefault(linear, []).append((lora.lora.deltas[module], lora.strength))
            paths[linear] = module
    if merge:
        refused = [(paths[linear], why) for linear in targets if (why := _unmergeable(linear))]
        if refused:
            module, why = refused[0]
            raise ValueError(
                f"LoRA cannot be merged into {module}: its weight is a {why} (quantised or sharded); "
                "merge before quantising or sharding, or apply it unmerged"
            )
    transformer = transformer_of(model)
    input_weight = transformer.x_embedder.proj.weight
    compute_device = torch.device(device) if device is not None else None
    loaded = LoadedLoras(named, targets, merged=merge, device=compute_device)
    if merge:
        loaded._add(1.0)
    else:
        loaded._hook(input_weight.dtype, compute_device or input_weight.device)
    log.info(
        "LoRA %s: %s on %d linears",
        "merged" if merge else "hooked",
        ", ".join(f"{lora.name} x {lora.strength:g}" for lora in named) or "none",
        len(targets),
    )
    return loaded
