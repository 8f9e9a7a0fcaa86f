"""The names one LoRA module has in each layout: the official DiT's, ComfyUI-WanVideoWrapper's, kohya's.

The official DiT fuses some projections that WanVideoWrapper's LongCat model keeps apart: ``attn.qkv`` is
its ``self_attn.q``, ``.k``, ``.v`` (output rows 0:C, C:2C, 2C:3C) and ``cross_attn.kv_linear`` its
``cross_attn.k``, ``.v``; every other module is renamed one to one (WVW ``wanvideo/modules/model.py``:
``WanSelfAttention`` q/k/v/o, ``modulation = Sequential(SiLU, Linear)``, ``Head_adaLN`` head/modulation,
``text_embedding``, ``time_embedding.mlp``, ``patch_embedding``). kohya files spell a path with ``_`` for
``.`` after ``lora_unet_`` (VideoX-Fun: ``lora_unet__``), which is only readable against known names.
Pure names, no torch: ``longcat-lora --help`` imports this.
"""

from __future__ import annotations

import re

BLOCKS = "blocks"

# The layouts ``lora_formats.write`` makes (``longcat-lora convert --to``).
WRITE_FORMATS = ("peft", "official", "comfyui")

# Official module path inside a block -> the WanVideoWrapper paths of its output row blocks, in row order.
WRAPPER_BLOCK_NAMES: dict[str, tuple[str, ...]] = {
    "adaLN_modulation.1": ("modulation.1",),
    "attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "attn.proj": ("self_attn.o",),
    "cross_attn.q_linear": ("cross_attn.q",),
    "cross_attn.kv_linear": ("cross_attn.k", "cross_attn.v"),
    "cross_attn.proj": ("cross_attn.o",),
    "ffn.w1": ("ffn.w1",),
    "ffn.w2": ("ffn.w2",),
    "ffn.w3": ("ffn.w3",),
}

# The same for the modules outside the blocks.
WRAPPER_TOP_NAMES: dict[str, tuple[str, ...]] = {
    "x_embedder.proj": ("patch_embedding",),
    "t_embedder.mlp.0": ("time_embedding.mlp.0",),
    "t_embedder.mlp.2": ("time_embedding.mlp.2",),
    "y_embedder.y_proj.0": ("text_embedding.0",),
    "y_embedder.y_proj.2": ("text_embedding.2",),
    "final_layer.linear": ("head.head",),
    "final_layer.adaLN_modulation.1": ("head.modulation.1",),
}

# Official modules whose output is used as n equal chunks; the official split LoRA files give each chunk
# its own down and up (``lora_up.blocks.{i}``): fused q|k|v, k|v, the six adaLN terms, the final two.
OFFICIAL_CHUNKS: dict[str, int] = {
    "attn.qkv": 3,
    "cross_attn.kv_linear": 2,
    "adaLN_modulation.1": 6,
    "final_layer.adaLN_modulation.1": 2,
}

# Official modules that are convolutions, not linears: a LoRA on them is not a matrix pair.
CONVOLUTIONS = frozenset({"x_embedder.proj"})

_BLOCK_PATH = re.compile(rf"^{BLOCKS}\.(\d+)\.(.+)$")
_BLOCK_UNDERSCORED = re.compile(rf"^{BLOCKS}_(\d+)_(.+)$")

# Wrapper path -> (official path, row block, row blocks), inside a block and outside.
_FROM_WRAPPER_BLOCK = {
    wrapper: (official, i, len(names))
    for official, names in WRAPPER_BLOCK_NAMES.items()
    for i, wrapper in enumerate(names)
}
_FROM_WRAPPER_TOP = {
    wrapper: (official, i, len(names))
    for official, names in WRAPPER_TOP_NAMES.items()
    for i, wrapper in enumerate(names)
}


def split_block(path: str) -> tuple[int | None, str]:
    """``blocks.3.attn.qkv`` -> ``(3, "attn.qkv")``; a path outside the blocks -> ``(None, path)``."""
    match = _BLOCK_PATH.match(path)
    return (int(match.group(1)), match.group(2)) if match else (None, path)


def _join(block: int | None, path: str) -> str:
    return path if block is None else f"{BLOCKS}.{block}.{path}"


def is_official(path: str) -> bool:
    block, inner = split_block(path)
    return inner in (WRAPPER_BLOCK_NAMES if block is not None else WRAPPER_TOP_NAMES)


def official_part(path: str) -> tuple[str, int, int] | None:
    """The official module a path of either layout updates: ``(official path, row block, row blocks)``.

    ``blocks.0.self_attn.k`` -> ``("blocks.0.attn.qkv", 1, 3)``; ``blocks.0.attn.qkv`` ->
    ``("blocks.0.attn.qkv", 0, 1)`` (the whole module). None for a path of neither layout.
    """
    if is_official(path):
        return path, 0, 1
    block, inner = split_block(path)
    found = (_FROM_WRAPPER_BLOCK if block is not None else _FROM_WRAPPER_TOP).get(inner)
    if found is None:
        return None
    official, part, parts = found
    return _join(block, official), part, parts


def wrapper_names(path: str) -> tuple[str, ...] | None:
    """The WanVideoWrapper paths of an official module's row blocks (None: not an official module)."""
    block, inner = split_block(path)
    names = (WRAPPER_BLOCK_NAMES if block is not None else WRAPPER_TOP_NAMES).get(inner)
    return None if names is None else tuple(_join(block, n) for n in names)


def chunks(path: str) -> int:
    """How many equal chunks the official model makes of this module's output (1: used whole)."""
    return OFFICIAL_CHUNKS.get(split_block(path)[1], 1)


def is_convolution(path: str) -> bool:
    return split_block(path)[1] in CONVOLUTIONS


_UNDERSCORED_BLOCK = {
    name.replace(".", "_"): name
    for official, names in WRAPPER_BLOCK_NAMES.items()
    for name in (official, *names)
}
_UNDERSCORED_TOP = {
    name.replace(".", "_"): name
    for official, names in WRAPPER_TOP_NAMES.items()
    for name in (official, *names)
}


def resolve_underscored(name: str) -> str | None:
    """A kohya module name with ``_`` for ``.`` back to its path in either layout:
    ``blocks_0_cross_attn_kv_linear`` -> ``blocks.0.cross_attn.kv_linear``; None when it names no module."""
    match = _BLOCK_UNDERSCORED.match(name)
    if match:
        inner = _UNDERSCORED_BLOCK.get(match.group(2))
        return None if inner is None else _join(int(match.group(1)), inner)
    return _UNDERSCORED_TOP.get(name)
