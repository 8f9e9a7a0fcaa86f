"""The configs of ``longcat-lora`` (one per subcommand); each field is a flag (``longcat_data.flags``).
Imports no torch, so ``--help`` and refused flags answer at once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from longcat_data.flags import Check, ConfigError, option
from longcat_train.lora_layouts import WRITE_FORMATS

# `--model` of inspect besides a checkpoint folder: the built-in configs.
BUILT_IN_MODELS = ("full", "tiny")


def parse_alpha(text: str | float) -> float | str:
    """``--alpha``: a positive number, or ``rank`` (alpha = each module's rank: scale 1)."""
    if isinstance(text, str) and text.strip().lower() == "rank":
        return "rank"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"a positive number or 'rank', got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"a positive number or 'rank', got {text!r}")
    return value


_ALPHA = Check(
    lambda v: v == "rank" or (not isinstance(v, str) and math.isfinite(v) and v > 0), "> 0, or rank"
)
_EXISTING_FILE = Check(lambda p: Path(p).is_file(), "an existing .safetensors file")
_MODEL = Check(
    lambda m: (
        m in BUILT_IN_MODELS or (Path(m) / "config.json").is_file() or (Path(m) / "dit/config.json").is_file()
    ),
    "full, tiny, or a LongCat-Video checkpoint folder (its dit/config.json is read)",
)


@dataclass
class InspectLoraConfig:
    """``longcat-lora inspect``: layout, modules, ranks, alpha, split modules, the model it fits, what a
    ComfyUI-WanVideoWrapper load would drop."""

    file: str = option(help="a LoRA .safetensors file in any layout", positional=True, check=_EXISTING_FILE)
    model: str = option(
        "full", "the DiT whose shapes the LoRA must fit: full, tiny, or a checkpoint folder", check=_MODEL
    )


@dataclass
class ConvertLoraConfig:
    """``longcat-lora convert``: rewrite a LoRA in another layout (the same update)."""

    input: str = option(help="a LoRA .safetensors file in any layout", positional=True, check=_EXISTING_FILE)
    output: str = option(help="the .safetensors file to write (atomically)", positional=True)
    to: str = option(
        "comfyui",
        "layout to write: peft (our lora.safetensors, diffusers), official (lora_longcat.safetensors, the "
        "official load_lora), comfyui (ComfyUI-WanVideoWrapper's model names)",
        choices=WRITE_FORMATS,
    )
    alpha: float | str | None = option(
        None,
        "the alpha of a file that states none (VideoX-Fun's): the lora_alpha it was trained with, or 'rank' "
        "(scale 1, as ComfyUI applies such a file)",
        parse=parse_alpha,
        metavar="A",
        check=_ALPHA,
    )
