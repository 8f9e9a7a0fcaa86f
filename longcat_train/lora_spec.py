"""``PATH[:STRENGTH]``: how a flag or a config file names a LoRA file and the strength to apply it at.

The strength is what follows the last ``:`` when that is a number, so Windows paths (``C:\\loras\\a``) and
paths holding a ``:`` still name a file; a file whose name itself ends in ``:NUMBER`` is given with an
explicit strength (``name:0.5:1``). Imports no torch: configs check their LoRA values with it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from longcat_data.flags import Check

# Inclusive: past these a strength is a typo, on the command line and the preview page alike.
STRENGTH_RANGE = (-4.0, 4.0)

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and its strength; ``strength`` None: the command's default strength."""

    path: str
    strength: float | None = None

    def entry(self, default: float) -> tuple[str, float]:
        """``(path, strength)`` as ``longcat_train.lora.load_loras`` takes it."""
        return self.path, default if self.strength is None else self.strength


def parse_lora_spec(text: str) -> LoraSpec:
    """``"style.safetensors:0.8"`` -> ``LoraSpec("style.safetensors", 0.8)``; no number after the last
    ``:`` (or no ``:``): the whole text is the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path and _NUMBER.fullmatch(tail.strip()):
        return LoraSpec(path, float(tail))
    return LoraSpec(text)


def strength_allowed(strength: float) -> bool:
    low, high = STRENGTH_RANGE
    return math.isfinite(strength) and low <= strength <= high


def _specs_allowed(values: list[str]) -> bool:
    specs = [parse_lora_spec(v) for v in values]
    return all(s.path.strip() and (s.strength is None or strength_allowed(s.strength)) for s in specs)


LORA_SPECS = Check(
    _specs_allowed,
    f"PATH or PATH:STRENGTH, STRENGTH a finite number in [{STRENGTH_RANGE[0]:g}, {STRENGTH_RANGE[1]:g}]",
)
LORA_SPEC = Check(
    lambda value: value is None or _specs_allowed([value]),
    f"PATH or PATH:STRENGTH, STRENGTH a finite number in [{STRENGTH_RANGE[0]:g}, {STRENGTH_RANGE[1]:g}]",
)
