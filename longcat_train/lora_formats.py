"""LoRA files of every layout in the LongCat-Video ecosystem <-> one :class:`LowRankSet`.

Read (:func:`read_file`, :func:`read_any`), by key shape, whatever tool wrote the file:

- ``official``: ``lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv``
  + ``.lora_down.weight`` ``[n*r, in]``, ``.lora_up.weight`` or the split ``.lora_up.blocks.{i}.weight``,
  ``.alpha_scale`` (LongCat-Video ``modules/lora_utils.py``; ours: ``lora_longcat.safetensors``).
- ``peft``: ``<module>.lora_A.weight`` / ``.lora_B.weight`` on official names, behind ``transformer.``
  (diffusers, ours: ``lora.safetensors``, SimpleTuner), ``diffusion_model.`` (SimpleTuner's
  ``lora_format=comfyui``, with ``<module>.alpha``) or nothing (VideoX-Fun's peft file, no alpha);
  alpha from ``.alpha`` keys or the ``lora_adapter_metadata`` header (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``).
- ``diffsynth``: ``blocks.0.attn.qkv.lora_A.default.weight``: DiffSynth-Studio trains with alpha = rank.
- ``kohya``: ``lora_unet__blocks_0_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` (+ ``.alpha``):
  VideoX-Fun's files, with or without alpha.
- ``comfyui``: the ComfyUI-WanVideoWrapper model's names (``diffusion_model.blocks.0.self_attn.q``,
  ``cross_attn.k``, ``modulation.1``, ``head.head``, ...) in any of the spellings above: q/k/v and k/v
  parts become the row pieces of the fused official module.

A file that states no alpha is refused unless one is given (``alpha``): its trainer's alpha cannot be
told from the weights. Written (:func:`write`) as ``peft``, ``official`` or ``comfyui`` (the layout
WanVideoWrapper loads completely); what a layout cannot hold is returned as notes, never dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from longcat_data.files import replace_atomic
from longcat_train import lora_layouts as layouts
from longcat_train.lora_layouts import WRITE_FORMATS
from longcat_train.lora_pieces import (
    merge_shared_down,
    one_piece,
    padded,
    rescaled,
    row_parts,
    split_block_diagonal,
)
from longcat_train.lowrank import LowRankDelta, LowRankPiece, LowRankSet

log = logging.getLogger(__name__)

OFFICIAL_PREFIX = "lora___lorahyphen___"
OFFICIAL_HYPHEN = "___lorahyphen___"
KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
COMFYUI_PREFIX = "diffusion_model."
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry for the peft adapter config

# Prefixes tools put before module paths: ComfyUI (its checkpoints too), diffusers, peft's wrapper,
# DiffSynth's pipeline, DDP.
_PREFIXES = (
    "model.diffusion_model.",
    COMFYUI_PREFIX,
    DIFFUSERS_PREFIX,
    "base_model.model.",
    "pipe.dit.",
    "module.",
)

_DOTTED_ROLE = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<down>lora_A|lora_down)(?P<default>\.default)?\.weight"
    r"|(?P<up>lora_B|lora_up)(?P<default_up>\.default)?\.weight|(?P<alpha>alpha))$"
)
_OFFICIAL_ROLE = re.compile(
    r"^(?:lora_down\.weight|lora_up\.weight|lora_up\.blocks\.(?P<block>\d+)\.weight|alpha_scale)$"
)
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


_NOT_A_MATRIX_PAIR = "not a matrix pair (a convolution LoRA?)"


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read or written as asked; one line naming the file and the fix."""


@dataclass
class SourceModule:
    """One module of a file, in the file's own layout, and the official module it updates."""

    name: str  # as the file names it, dotted: blocks.0.self_attn.q
    target: str  # the official module: blocks.0.attn.qkv
    part: int  # which row block of the target (0 of 1: all of it)
    parts: int
    pieces: tuple[LowRankPiece, ...]
    scale: float | None  # alpha / rank as the file states it; None when it states none


@dataclass
class ParsedFile:
    """What a file holds, before alpha is settled: :func:`resolve` makes the LowRankSet."""

    format: str
    modules: list[SourceModule]
    unread: list[tuple[str, str]]  # (key, why it is not part of the LoRA read)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def missing_alpha(self) -> list[str]:
        return [m.name for m in self.modules if m.scale is None]


# ---------------------------------------------------------------- reading


def _key_roles(key: str) -> tuple[str, str, str, bool] | None:
    """(style, module path in the file's layout, role, adapter-named) of a LoRA key, or None.
    Roles: ``down``, ``up``, ``up.{i}`` (an official split block), ``alpha``, ``alpha_scale``."""
    if key.startswith(OFFICIAL_PREFIX):
        name, _, role = key[len(OFFICIAL_PREFIX) :].partition(".")
        match = _OFFICIAL_ROLE.match(role)
        if not match:
            return None
        path = name.replace(OFFICIAL_HYPHEN, ".")
        if layouts.official_part(path) is None:
            return None
        kind = f"up.{match['block']}" if match["block"] else role.split(".")[0].removeprefix("lora_")
        return "official", path, kind, False
    if key.startswith(KOHYA_PREFIX):
        name, _, role = key.partition(".")
        path = layouts.resolve_underscored(name.removeprefix(KOHYA_PREFIX).removeprefix("_"))
        if path is None or role not in _KOHYA_ROLES:
            return None
        return "kohya", path, _KOHYA_ROLES[role], False
    rest = next((key[len(p) :] for p in _PREFIXES if key.startswith(p)), key)
    match = _DOTTED_ROLE.match(rest)
    if not match or layouts.official_part(match["module"]) is None:
        return None
    role = "down" if match["down"] else "up" if match["up"] else "alpha"
    return "dotted", match["module"], role, bool(match["default"] or match["default_up"])


def key_module(key: str) -> str | None:
    """The official module a LoRA key of any layout updates (None: not a LoRA key of the DiT)."""
    found = _key_roles(key)
    return None if found is None else layouts.official_part(found[1])[0]


def _why_unread(key: str, tensor: torch.Tensor) -> str:
    if re.search(r"\.(dora_scale|lora_mid\.weight|diff|diff_b|w_norm|b_norm|set_weight)$|lora_B\.bias$", key):
        return "an adapter part this tool does not apply (DoRA, LoCon, full diffs, biases)"
    if re.search(r"(lora_[AB]|lora_(down|up))(\.default)?\.weight$|\.alpha$", key):
        return "a LoRA on a module the LongCat-Video DiT does not have"
    return f"not a LoRA tensor (shape {tuple(tensor.shape)})"


def _adapter_config(metadata: dict[str, str], path: str | Path) -> dict:
    """The peft adapter config of a file: a diffusers-style header entry (keys with or without
    ``transformer.``), else peft's ``adapter_config.json`` beside it; {} when neither is there."""
    text, where = metadata.get(METADATA_KEY), f"the {METADATA_KEY} header entry of {path}"
    beside = Path(path).with_name("adapter_config.json") if path else None
    if not text and beside is not None and beside.is_file():
        text, where = beside.read_text(errors="replace"), str(beside)
    if not text:
        return {}
    try:
        stored = json.loads(text)
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict):
        raise LoraFormatError(f"{where}: the adapter config is not a JSON object; fix or remove it")
    return {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in stored.items()}


def _stated_alpha(config: dict, module: str) -> float | None:
    """peft's rule: an ``alpha_pattern`` entry matching the module (``(.*\\.)?(key)$``), else ``lora_alpha``."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    alpha = config.get("lora_alpha")
    return float(alpha) if alpha is not None else None


def _scalar(tensor: torch.Tensor, name: str, path: str | Path) -> float:
    if tensor.numel() != 1:
        raise LoraFormatError(f"{path}: the alpha of {name} has shape {tuple(tensor.shape)}, not one number")
    return float(tensor.float().item())


def _pieces(name: str, roles: dict[str, torch.Tensor], path: str) -> tuple[LowRankPiece, ...]:
    down = roles.get("down")
    blocks = sorted((int(r[3:]), t) for r, t in roles.items() if r.startswith("up."))
    ups = [t for _, t in blocks] if blocks else [roles["up"]] if "up" in roles else []
    if blocks and "up" in roles:
        raise LoraFormatError(f"{path}: {name} has both lora_up.weight and lora_up blocks: one or the other")
    if down is None or not ups:
        raise LoraFormatError(
            f"{path}: {name} has {'no down' if down is None else 'no up'} matrix, so it is not a whole LoRA"
        )
    if blocks and [i for i, _ in blocks] != list(range(len(blocks))):
        raise LoraFormatError(
            f"{path}: {name} has lora_up blocks {[i for i, _ in blocks]}; blocks 0 to "
            f"{blocks[-1][0]} must all be there"
        )
    if down.shape[0] % len(ups):
        raise LoraFormatError(f"{path}: {name}: lora_down has {down.shape[0]} rows for {len(ups)} up blocks")
    try:
        rank = down.shape[0] // len(ups)
        pieces = tuple(LowRankPiece(down[i * rank : (i + 1) * rank], up) for i, up in enumerate(ups))
        LowRankDelta(pieces, 1.0)
    except ValueError as err:
        raise LoraFormatError(f"{path}: {name}: {err}") from None
    return pieces


def parse_file(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path = ""
) -> ParsedFile | None:
    """The modules of a LoRA file (safetensors tensors and header), or None when no key is a LoRA
    matrix of a LongCat-Video module in any layout this module reads."""
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], list[str]] = {}
    unread: list[tuple[str, str]] = []
    adapter_named = False
    for key, tensor in tensors.items():
        found = _key_roles(key)
        if found is None:
            unread.append((key, _why_unread(key, tensor)))
            continue
        style, name, role, default = found
        adapter_named |= default
        group = grouped.setdefault((style, name), {})
        if role in group:
            raise LoraFormatError(
                f"{path}: {key} and {keys[(style, name)][0]} give the same {role} of {name}"
            )
        group[role] = tensor
        keys.setdefault((style, name), []).append(key)
    matrices = {k: v for k, v in grouped.items() if "down" in v or "up" in v or "up.0" in v}
    if not matrices:
        return None
    styles = {style for style, _ in matrices}
    wrapper = any(not layouts.is_official(name) for _, name in matrices)
    fmt = (
        "official" if "official" in styles else "comfyui" if wrapper else "kohya" if "kohya" in styles
        else "diffsynth" if adapter_named else "peft"
    )  # fmt: skip
    config = _adapter_config(metadata, path)
    rslora = bool(config.get("use_rslora"))
    modules = []
    for (style, name), roles in grouped.items():
        if (style, name) not in matrices:
            unread.extend((key, "an alpha without LoRA matrices") for key in keys[(style, name)])
            continue
        if any(t.ndim != 2 for r, t in roles.items() if r not in ("alpha", "alpha_scale")):
            unread.extend((key, _NOT_A_MATRIX_PAIR) for key in keys[(style, name)])
            continue
        pieces = _pieces(name, roles, str(path))
        rank = pieces[0].rank
        if "alpha_scale" in roles:
            scale = _scalar(roles["alpha_scale"], name, path)
        elif "alpha" in roles:
            scale = _scalar(roles["alpha"], name, path) / rank
        elif style == "official" and metadata.get("lora_network_alpha"):
            scale = float(metadata["lora_network_alpha"]) / rank
        elif (alpha := _stated_alpha(config, name)) is not None:
            scale = alpha / (rank**0.5 if rslora else rank)
        elif fmt == "diffsynth":
            scale = 1.0  # DiffSynth-Studio's LoraConfig(lora_alpha=rank)
        else:
            scale = None
        target, part, parts = layouts.official_part(name)
        modules.append(SourceModule(name, target, part, parts, pieces, scale))
    return ParsedFile(fmt, modules, unread, dict(metadata))


def _alpha_scale(module: SourceModule, alpha: float | str | None) -> float | None:
    if module.scale is not None:
        return module.scale
    if alpha == "rank":
        return 1.0
    return None if alpha is None else float(alpha) / module.pieces[0].rank


def resolve(parsed: ParsedFile, path: str | Path = "", alpha: float | str | None = None) -> LowRankSet:
    """The LowRankSet of a parsed file: wrapper parts joined into their official modules (a missing part
    is a zero piece), split modules kept as pieces. ``alpha`` is used where the file states none (a
    number, or ``"rank"``: alpha = rank, scale 1, as ComfyUI applies such a file); without it such a
    file is refused."""
    if not parsed.modules:
        key, why = parsed.unread[0]
        raise LoraFormatError(f"{path}: none of its LoRA modules can be applied (e.g. {key}: {why})")
    missing = parsed.missing_alpha
    if missing and alpha is None:
        raise LoraFormatError(
            f"{path}: the file states no alpha (e.g. for {missing[0]}), and alpha / rank scales every update; "
            f"convert it with the alpha it was trained with: longcat-lora convert {path} OUT --to peft "
            "--alpha A (or --alpha rank: scale 1, as ComfyUI applies it)"
        )
    if alpha is not None and not missing:
        log.warning("%s states its alpha; the alpha given (%s) is not used", path, alpha)
    targets: dict[str, dict[int, SourceModule]] = {}
    for module in parsed.modules:
        parts = targets.setdefault(module.target, {})
        if module.part in parts or (parts and next(iter(parts.values())).parts != module.parts):
            raise LoraFormatError(
                f"{path}: {module.target} is given twice (as {module.name} and another key)"
            )
        parts[module.part] = module
    deltas: dict[str, LowRankDelta] = {}
    for target, parts in targets.items():
        deltas[target] = _joined(target, parts, alpha, path)
    return LowRankSet(deltas, parsed.format, dict(parsed.metadata))


def _joined(
    target: str, parts: dict[int, SourceModule], alpha: float | str | None, path: str | Path
) -> LowRankDelta:
    known = next(iter(parts.values()))
    scales = {i: _alpha_scale(m, alpha) for i, m in parts.items()}
    # Parts stated at different scales share the first non-zero one; the others' ups absorb the ratio.
    base = next((s for _, s in sorted(scales.items()) if s), 0.0)
    pieces: list[LowRankPiece] = []
    try:
        for i in range(known.parts):
            if i not in parts:
                shape = known.pieces[0]
                rows = sum(p.up.shape[0] for p in known.pieces)
                zero = LowRankPiece(
                    shape.down.new_zeros(shape.down.shape), shape.up.new_zeros(rows, shape.rank)
                )
                pieces.append(zero)
                continue
            pieces.extend(rescaled(p, scales[i] / base) if base else p for p in parts[i].pieces)
        delta = merge_shared_down(LowRankDelta(tuple(pieces), base))
    except ValueError as err:
        raise LoraFormatError(f"{path}: the parts of {target} do not fit together: {err}") from None
    return split_block_diagonal(delta, layouts.chunks(target))


def read_any(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    path: str | Path,
    *,
    alpha: float | str | None = None,
) -> LowRankSet | None:
    """The LowRankSet of a LoRA file's tensors in any layout this module reads; None when none fits.
    Keys outside the LoRA (other models' modules, DoRA scales, ...) are skipped with a warning."""
    parsed = parse_file(tensors, metadata, path)
    if parsed is None:
        return None
    if parsed.unread:
        key, why = parsed.unread[0]
        log.warning("%s: %d keys not read, e.g. %s (%s)", path, len(parsed.unread), key, why)
    return resolve(parsed, path, alpha)


def _not_safetensors(path: str | Path) -> LoraFormatError:
    return LoraFormatError(
        f"{path}: not a safetensors file; LoRAs are read from .safetensors only "
        "(convert a .ckpt or .bin with safetensors.torch.save_file)"
    )


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the header metadata of a safetensors file (LoraFormatError when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = tqdm(f.keys(), desc=f"reading {path.name}", unit="tensor", leave=False, disable=None)
            return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise _not_safetensors(path) from err


def _not_a_lora(path: str | Path, keys: list[str]) -> LoraFormatError:
    what = f"e.g. key {keys[0]}" if keys else "it holds no tensors"
    return LoraFormatError(f"{path}: not a LongCat-Video LoRA in any layout this tool reads ({what})")


def read_file(path: str | Path, *, alpha: float | str | None = None) -> LowRankSet:
    """The LowRankSet of a LoRA file in any layout :func:`read_any` reads, or LoraFormatError (also for
    values that are not finite)."""
    tensors, metadata = load_tensors(path)
    lora = read_any(tensors, metadata, path, alpha=alpha)
    if lora is None:
        raise _not_a_lora(path, list(tensors))
    for module, delta in lora.deltas.items():
        finite = math.isfinite(delta.scale) and all(
            bool(torch.isfinite(t).all()) for p in delta.pieces for t in (p.down, p.up)
        )
        if not finite:
            raise LoraFormatError(
                f"{path}: the LoRA of {module} holds values that are not finite (NaN or inf)"
            )
    return lora


def check_file(path: str | Path) -> None:
    """LoraFormatError unless ``path`` is a safetensors file holding LoRA matrices of LongCat-Video
    modules in a layout :func:`read_file` reads. The header alone is read, so a command refuses a
    wrong file (a ``.ckpt``, a full model, another model's LoRA) before any model loads."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _not_safetensors(path) from err
    matrices = [k for k in shapes if (found := _key_roles(k)) and found[2] not in ("alpha", "alpha_scale")]
    if not matrices:
        raise _not_a_lora(path, list(shapes))
    if not any(len(shapes[k]) == 2 for k in matrices):
        raise LoraFormatError(
            f"{path}: none of its LoRA modules can be applied (e.g. {matrices[0]}: {_NOT_A_MATRIX_PAIR})"
        )


def from_peft_weights(weights: dict[str, torch.Tensor], settings: dict) -> LowRankSet:
    """Our canonical adapter weights (``blocks.0.attn.qkv.lora_A.weight``, ``lora.lora_weights``) with
    their ``{"r", "lora_alpha"}`` as a LowRankSet."""
    scale = settings["lora_alpha"] / settings["r"]
    deltas = {}
    for key, down in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = weights[f"{module}.lora_B.weight"]
            deltas[module] = LowRankDelta((LowRankPiece(down.detach(), up.detach()),), scale)
    return LowRankSet(deltas, "peft")


# ---------------------------------------------------------------- writing

Tensors = dict[str, torch.Tensor]


def _unshared(tensors: Tensors) -> Tensors:
    """On the CPU, contiguous, each with its own memory: safetensors refuses tensors sharing memory
    (a down shared by row pieces, row slices of one up); only those are copied."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def _alpha(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def _matrix_modules(lora: LowRankSet, layout: str) -> tuple[dict[str, LowRankDelta], list[str]]:
    """The deltas a layout of matrix pairs can hold: a convolution's update is no matrix pair there."""
    notes = [
        f"{m}: a convolution, which the {layout} layout holds no LoRA for"
        for m in lora.deltas
        if layouts.is_convolution(m)
    ]
    return {m: d for m, d in lora.deltas.items() if not layouts.is_convolution(m)}, notes


def peft_tensors(lora: LowRankSet) -> tuple[Tensors, dict[str, str], list[str]]:
    """Our ``lora.safetensors`` layout (diffusers/peft): one pair per module; ranks or alphas that differ
    from the most common are peft's ``rank_pattern`` / ``alpha_pattern`` in the adapter config."""
    deltas, notes = _matrix_modules(lora, "peft")
    if not deltas:
        return {}, {}, notes
    tensors: Tensors = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module, delta in deltas.items():
        piece = one_piece(delta).pieces[0]
        tensors[f"{DIFFUSERS_PREFIX}{module}.lora_A.weight"] = piece.down
        tensors[f"{DIFFUSERS_PREFIX}{module}.lora_B.weight"] = piece.up
        ranks[module], alphas[module] = piece.rank, delta.scale * piece.rank
    rank, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    config: dict = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(deltas)}
    rank_pattern = {m: r for m, r in ranks.items() if r != rank}
    alpha_pattern = {m: a for m, a in alphas.items() if a != alpha}
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern
    header = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}),
    }
    return tensors, header, notes


def official_tensors(lora: LowRankSet) -> tuple[Tensors, dict[str, str], list[str]]:
    """The file the official ``load_lora(path, key, lora_network_dim=R)`` loads strictly: split modules
    as ``lora_up.blocks.{i}``, one rank R for every module (smaller ones padded with zeros, exact),
    ``alpha_scale`` per module."""
    deltas, notes = _matrix_modules(lora, "official")
    shaped = {}
    for module, delta in deltas.items():
        if not layouts.is_official(module):
            notes.append(f"{module}: not a module of the official DiT, not written")
            continue
        delta = merge_shared_down(delta)
        rows = {p.up.shape[0] for p in delta.pieces}
        shaped[module] = delta if len(rows) == 1 else one_piece(delta)
    if not shaped:
        return {}, {}, notes
    rank = max(p.rank for d in shaped.values() for p in d.pieces)
    if any(p.rank != rank for d in shaped.values() for p in d.pieces):
        log.info("official layout: every module at rank %d (the official loader takes one rank)", rank)
    tensors: Tensors = {}
    for module, delta in shaped.items():
        name = OFFICIAL_PREFIX + module.replace(".", OFFICIAL_HYPHEN)
        pieces = [padded(p, rank) for p in delta.pieces]
        tensors[f"{name}.lora_down.weight"] = torch.cat([p.down for p in pieces])
        if len(pieces) == 1:
            tensors[f"{name}.lora_up.weight"] = pieces[0].up
        for i, piece in enumerate(pieces if len(pieces) > 1 else []):
            tensors[f"{name}.lora_up.blocks.{i}.weight"] = piece.up
        tensors[f"{name}.alpha_scale"] = _alpha(delta.scale)
    alpha = _most_common([d.scale * rank for d in shaped.values()])
    header = {"format": "pt", "lora_network_dim": str(rank), "lora_network_alpha": str(alpha)}
    return tensors, header, notes


def comfyui_tensors(lora: LowRankSet) -> tuple[Tensors, dict[str, str], list[str]]:
    """The ComfyUI-WanVideoWrapper layout: ``diffusion_model.<wrapper path>.lora_A.weight`` /
    ``.lora_B.weight`` / ``.alpha`` (ComfyUI applies ``alpha / rank``). Fused modules become their
    parts' rows (a shared down stays shared, split pieces keep their own); a split adaLN becomes one
    block-diagonal pair of rank n*r."""
    tensors: Tensors = {}
    notes = []
    for module, delta in lora.deltas.items():
        names = layouts.wrapper_names(module)
        if names is None:
            notes.append(f"{module}: not a module of the official DiT, so it has no WanVideoWrapper name")
            continue
        if layouts.is_convolution(module):
            notes.append(
                f"{module}: not written; a LoRA on WanVideoWrapper's {names[0]} switches its loader to "
                "Control-LoRA mode"
            )
            continue
        for name, piece in zip(names, row_parts(delta, len(names)), strict=True):
            tensors[f"{COMFYUI_PREFIX}{name}.lora_A.weight"] = piece.down
            tensors[f"{COMFYUI_PREFIX}{name}.lora_B.weight"] = piece.up
            tensors[f"{COMFYUI_PREFIX}{name}.alpha"] = _alpha(delta.scale * piece.rank)
    return tensors, {"format": "pt"}, notes


_WRITERS = {"peft": peft_tensors, "official": official_tensors, "comfyui": comfyui_tensors}


def write(lora: LowRankSet, path: str | Path, to: str) -> list[str]:
    """Write ``lora`` in layout ``to`` (one of WRITE_FORMATS) atomically; returns one line per module
    the layout cannot hold (also logged). LoraFormatError when nothing at all could be written."""
    if to not in _WRITERS:
        raise LoraFormatError(f"unknown LoRA layout {to!r}: choose one of {', '.join(WRITE_FORMATS)}")
    tensors, header, notes = _WRITERS[to](lora)
    for note in notes:
        log.warning("%s: %s", path, note)
    if not tensors:
        raise LoraFormatError(
            f"{path}: nothing of this LoRA can be written in the {to} layout ({notes[0] if notes else 'it is empty'})"
        )
    tensors = _unshared(tensors)
    replace_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return notes


def write_comfyui(lora: LowRankSet, path: str | Path) -> list[str]:
    """The ComfyUI-WanVideoWrapper file (``lora_comfyui.safetensors`` beside a run's other LoRA files)."""
    return write(lora, path, "comfyui")
