"""DiT weights in the official layout: load (tiny, checkpoint directory, hub id) and save.

The official ``dit/`` folder holds ``config.json``, fp32 safetensors shards and
``diffusion_pytorch_model.safetensors.index.json``. Loading builds the model on the meta device, then reads
one shard at a time, casting each tensor to the target dtype as it is read, so the fp32 checkpoint is never
held in memory; at the end every parameter must have been loaded exactly once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longcat_data.defaults import TINY, TINY_SEED
from longcat_data.encode import resolve_checkpoint, save_tiny_encoders
from longcat_data.flags import parse_size
from longcat_train.dit_config import DiTConfig
from longcat_train.model import LongCatVideoTransformer

log = logging.getLogger(__name__)

DIT_SUBFOLDER = "dit"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def tiny_dit() -> LongCatVideoTransformer:
    """The tiny DiT with fixed random weights: every ``--model tiny`` sees the same network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return LongCatVideoTransformer(DiTConfig.tiny())


def resolve_dit_dir(model: str) -> Path:
    """The ``dit/`` folder of a checkpoint directory or hub id; a path to the ``dit/`` folder itself works."""
    path = Path(model).expanduser()
    if (path / CONFIG_NAME).is_file() and ((path / INDEX_NAME).is_file() or (path / WEIGHTS_NAME).is_file()):
        return path
    return resolve_checkpoint(model, [DIT_SUBFOLDER]) / DIT_SUBFOLDER


def load_dit(
    model: str, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> LongCatVideoTransformer:
    """The DiT of ``model``: ``tiny``, an official checkpoint directory (or its ``dit/``), or a hub id."""
    if model == TINY:
        return tiny_dit().to(device=device, dtype=dtype)
    dit_dir = resolve_dit_dir(model)
    config = DiTConfig.from_dict(json.loads((dit_dir / CONFIG_NAME).read_text()))
    with torch.device("meta"):
        dit = LongCatVideoTransformer(config)
    load_weights(dit, _weight_files(dit_dir), dtype=dtype, device=device)
    log.info(
        "loaded DiT from %s: %.1fM parameters, %s on %s",
        dit_dir,
        sum(p.numel() for p in dit.parameters()) / 1e6,
        dtype,
        device,
    )
    return dit


def _weight_files(dit_dir: Path) -> list[Path]:
    index = dit_dir / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [dit_dir / name for name in sorted(set(weight_map.values()))]
    if (dit_dir / WEIGHTS_NAME).is_file():
        return [dit_dir / WEIGHTS_NAME]
    raise FileNotFoundError(f"{dit_dir} has neither {INDEX_NAME} nor {WEIGHTS_NAME}")


def load_weights(
    model: torch.nn.Module, files: Iterable[Path], dtype: torch.dtype, device: torch.device | str
) -> None:
    """Stream safetensors ``files`` into ``model`` (typically built on the meta device), strictly.

    Raises:
        ValueError: listing keys the model has that no file provided, keys no parameter takes, keys present
            in more than one file, and shape mismatches.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    seen: dict[str, Path] = {}
    unexpected: list[str] = []
    duplicated: list[str] = []
    mismatched: list[str] = []
    for file in files:
        shard: dict[str, torch.Tensor] = {}
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in seen:
                    duplicated.append(f"{key} ({seen[key].name} and {file.name})")
                elif key not in expected:
                    unexpected.append(key)
                elif tuple(f.get_slice(key).get_shape()) != expected[key]:
                    mismatched.append(
                        f"{key}: {tuple(f.get_slice(key).get_shape())} vs model {expected[key]}"
                    )
                else:
                    # Moved first, then cast: on a GPU the cast runs there; on CPU the move is a no-op.
                    shard[key] = f.get_tensor(key).to(device).to(dtype)
                seen.setdefault(key, file)
        # assign=True adopts the tensors (meta parameters have no storage to copy into).
        model.load_state_dict(shard, strict=False, assign=True)
        log.debug("loaded %d tensors from %s", len(shard), file.name)
    missing = sorted(set(expected) - set(seen))
    problems = [
        (label, keys)
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("in several files", duplicated),
            ("wrong shape", mismatched),
        )
        if keys
    ]
    if problems:
        lines = [
            f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in problems
        ]
        raise ValueError("DiT checkpoint does not match the model:\n  " + "\n  ".join(lines))


def save_official_layout(
    model: LongCatVideoTransformer, directory: str | Path, max_shard_size: int | str = "5GB"
) -> Path:
    """Write ``model`` as an official ``dit/`` folder: config.json, safetensors shards and the index.

    Tensors keep their dtype (the official release is fp32). Shards are filled in parameter order up to
    ``max_shard_size`` and written one at a time, so only one shard is ever copied to host memory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    state = model.state_dict()
    groups: list[list[str]] = [[]]
    group_bytes = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if groups[-1] and group_bytes + size > limit:
            groups.append([])
            group_bytes = 0
        groups[-1].append(key)
        group_bytes += size
    weight_map: dict[str, str] = {}
    for number, keys in enumerate(groups, start=1):
        name = f"diffusion_pytorch_model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {k: state[k].detach().cpu().contiguous() for k in keys},
            directory / name,
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    log.info("wrote %s: %d shards, %.1f MB", directory, len(groups), total / 1e6)
    return directory


def save_tiny_checkpoint(directory: str | Path) -> Path:
    """A complete tiny checkpoint in the official layout: ``dit/`` (sharded) plus the tiny encoders."""
    directory = Path(directory)
    # Small shards so that even the tiny checkpoint exercises the sharded path.
    save_official_layout(tiny_dit(), directory / DIT_SUBFOLDER, max_shard_size="1MB")
    save_tiny_encoders(directory)
    return directory
