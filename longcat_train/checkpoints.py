"""Training checkpoints: what makes a resume exact, written atomically, verified, and found again.

``checkpoints/step-N`` holds the LoRA weights (fp32, in our three file layouts), the optimizer state, every RNG
each process draws from (torch CPU and CUDA, the noise generator, numpy, python), the config, the train
state (the step and the stream position: micro-batches each rank consumed) and, written last,
``checksums.json`` (sha256 and size of every other file). The data order is a function of (seed, epoch,
rank, worker), so a loader restarted at that position yields exactly the batches the uninterrupted run
would have. A checkpoint is written into ``step-N.partial``, its files flushed to disk, and renamed once
every rank is done, so a listed checkpoint is whole unless the disk changed it later; resuming verifies
the checksums and falls back to the newest intact checkpoint, naming each one it skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from longcat_data.files import write_json_atomic
from longcat_train import lora, lora_formats, parallel
from longcat_train.config import ConfigError, TrainConfig, save_config
from longcat_train.lowrank import LowRankSet
from longcat_train.parallel import Dist
from longcat_train.runs import (
    CHECKPOINTS,
    COMFYUI_LORA_FILE,
    CONFIG_FILE,
    LORA_FILE,
    OFFICIAL_LORA_FILE,
    list_checkpoints,
    remove_checkpoint,
    resume_mismatch,
)

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKSUMS_FILE = "checksums.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches this rank consumed: the stream position
    samples: int = 0  # samples consumed by all ranks together
    skipped_steps: int = 0  # updates dropped by the NaN/inf guard
    world_size: int = 1
    base_lora_sha256: dict[str, str] = field(default_factory=dict)  # each base_lora file it trains on


@dataclass
class Resumed:
    """A checkpoint that loaded on every rank: what ``train`` continues from."""

    path: Path
    state: TrainState
    lora: LowRankSet  # the trained adapter's weights
    optimizer: dict
    rng: dict


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / CHECKPOINTS


def check_resumable(path: Path, cfg: TrainConfig, d: Dist) -> None:
    saved = json.loads((path / CONFIG_FILE).read_text())
    diffs = resume_mismatch(saved, cfg)
    if diffs:
        raise ConfigError(f"cannot resume from {path}: the config differs in {'; '.join(diffs)}")
    state = json.loads((path / STATE_FILE).read_text())
    if state["world_size"] != d.world_size:
        raise ConfigError(
            f"cannot resume from {path}: it ran on {state['world_size']} processes, this run has "
            f"{d.world_size} (the data order depends on it)"
        )
    for lora_path, digest in state.get("base_lora_sha256", {}).items():
        if base_lora_digests([lora_path]).get(lora_path) != digest:
            raise ConfigError(
                f"cannot resume from {path}: base_lora {lora_path} is not the file it trained on (its "
                "content changed); put that file back, or start a new run"
            )


def base_lora_digests(paths: list[str]) -> dict[str, str]:
    """sha256 of each LoRA file a run merges into its base (a missing file has none)."""
    return {p: file_digest(Path(p))["sha256"] for p in paths if Path(p).is_file()}


def rng_state(generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])


def export_lora(train_model: nn.Module, model: nn.Module, directory: Path, d: Dist) -> None:
    """Write the LoRA files (ours, official, ComfyUI) into ``directory`` (rank 0); gathering is a
    collective under FSDP."""
    weights = lora.lora_weights(parallel.trainable_state(train_model))
    if d.main:
        write_lora_files(weights, lora.adapter_settings(model), directory)


def write_lora_files(weights: dict[str, torch.Tensor], settings: dict, directory: Path) -> None:
    lora.save_diffusers(weights, directory / LORA_FILE, settings)
    lora.save_official(weights, directory / OFFICIAL_LORA_FILE, settings)
    lora_formats.write_comfyui(
        lora_formats.from_peft_weights(weights, settings), directory / COMFYUI_LORA_FILE
    )


# ---------------------------------------------------------------- checksums


def file_digest(path: Path, *, flush: bool = False) -> dict:
    """``{"sha256", "bytes"}`` of a file; ``flush``: also force it to the disk (fsync)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        if flush:
            os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def write_checksums(directory: Path) -> None:
    """``checksums.json`` over every other file of ``directory``, after flushing them to the disk."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE)
    write_json_atomic(
        directory / CHECKSUMS_FILE, {"files": {p.name: file_digest(p, flush=True) for p in files}}
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_problem(path: Path, names: list[str]) -> str | None:
    """Why the files ``names`` of the checkpoint ``path`` cannot be trusted, or None: each must exist
    and, where the checkpoint has ``checksums.json`` (older ones have none), match its size and sha256."""
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    if not (path / CHECKSUMS_FILE).is_file():
        return None
    try:
        listed = json.loads((path / CHECKSUMS_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{CHECKSUMS_FILE} unreadable ({err})"
    for name in names:
        expected = listed.get(name)
        if expected is None:
            return f"{name} is not in {CHECKSUMS_FILE}"
        size = (path / name).stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written"
        if file_digest(path / name)["sha256"] != expected["sha256"]:
            return f"{name} differs from what was written (sha256)"
    return None


# ---------------------------------------------------------------- save and load


class CheckpointError(OSError):
    """A checkpoint could not be written (the disk refused a write); the ones before it are untouched."""


def save_checkpoint(
    cfg: TrainConfig,
    state: TrainState,
    train_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    d: Dist,
) -> Path:
    """Write ``checkpoints/step-N`` atomically: into ``step-N.partial``, renamed when every rank is done
    and ``checksums.json`` is written; then drop the oldest beyond ``checkpoints_total_limit``.

    A write the disk refuses (full, read-only, gone) on any rank is a CheckpointError on every rank,
    after the collectives all ranks take part in, so no rank is left waiting; the partial folder is
    removed."""
    root = checkpoint_root(cfg)
    final = root / f"step-{state.step:07d}"
    partial = final.with_name(final.name + ".partial")
    failures: list[str] = []

    def attempt(write: Callable[[], object]) -> None:
        if not failures:
            try:
                write()
            except OSError as err:
                failures.append(f"{type(err).__name__}: {err}")

    def check_all() -> None:
        if parallel.agree(int(bool(failures)), d, op="max"):
            if d.main:
                shutil.rmtree(partial, ignore_errors=True)
            newest = list_checkpoints(root)
            raise CheckpointError(
                f"checkpoint {final} not saved ({failures[0] if failures else 'on another rank'}); "
                f"the newest saved one is {newest[-1] if newest else 'none'}"
            )

    if d.main:
        attempt(lambda: (shutil.rmtree(partial, ignore_errors=True), partial.mkdir(parents=True)))
    parallel.barrier(d)
    attempt(lambda: torch.save(rng_state(generator), partial / rng_file(d.rank)))
    weights = lora.lora_weights(parallel.trainable_state(train_model))
    optim = parallel.optimizer_state(train_model, optimizer)
    if d.main:
        attempt(lambda: write_lora_files(weights, lora.adapter_settings(model), partial))
        attempt(lambda: torch.save(optim, partial / OPTIMIZER_FILE))
        attempt(lambda: save_config(cfg, partial / CONFIG_FILE))
        attempt(lambda: (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n"))
    check_all()
    if d.main:
        attempt(lambda: _publish(partial, final))
    check_all()
    if d.main:
        _drop_oldest(root, cfg.checkpoints_total_limit)
        log.info("saved checkpoint %s", final)
    parallel.barrier(d)
    return final


def _publish(partial: Path, final: Path) -> None:
    write_checksums(partial)
    _fsync_dir(partial)
    if final.exists():
        remove_checkpoint(final)
    partial.rename(final)
    _fsync_dir(final.parent)


def _drop_oldest(root: Path, limit: int) -> None:
    for old in list_checkpoints(root)[:-limit] if limit > 0 else []:
        try:
            remove_checkpoint(old)
        except OSError as err:
            log.warning("could not remove the old checkpoint %s (%s)", old, err)


def _load(path: Path, d: Dist) -> tuple[Resumed | None, str | None]:
    """This rank's part of checkpoint ``path``, or why it cannot be used."""
    names = [STATE_FILE, CONFIG_FILE, LORA_FILE, OPTIMIZER_FILE, rng_file(d.rank)]
    try:
        if d.main and (path / CHECKSUMS_FILE).is_file():
            # Rank 0 also vouches for the files no rank reads back (the official LoRA, other ranks' RNGs).
            names = sorted(set(names) | set(json.loads((path / CHECKSUMS_FILE).read_text())["files"]))
        problem = checkpoint_problem(path, names)
        if problem is not None:
            return None, problem
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        json.loads((path / CONFIG_FILE).read_text())  # check_resumable compares it next
        lora_set = lora_formats.read_file(path / LORA_FILE)
        optim = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
        rng = torch.load(path / rng_file(d.rank), map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged file fails in its reader's own way
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return None, f"does not load: {type(err).__name__}: {first}"
    return Resumed(path, state, lora_set, optim, rng), None


def load_checkpoint(candidates: list[Path], d: Dist) -> Resumed:
    """The first of ``candidates`` (newest first) that is intact and loads on every rank; each one
    skipped is named in a warning. ConfigError when none is."""
    skipped = []
    for path in candidates:
        resumed, problem = _load(path, d)
        # Every rank takes the same checkpoint: the first that loaded everywhere.
        if parallel.agree(int(resumed is not None), d, op="min"):
            log.info(
                "resuming from %s at step %d (%d samples seen)",
                path,
                resumed.state.step,
                resumed.state.samples,
            )
            return resumed
        reason = problem or "not intact on another rank"
        skipped.append(f"{path.name}: {reason}")
        if problem is not None or d.main:
            log.warning("checkpoint %s is not usable (%s): trying the one before it", path, reason)
    where = candidates[0].parent if candidates else "?"
    raise ConfigError(
        f"no intact checkpoint to resume from in {where} ({'; '.join(skipped)}): point --resume at "
        f"another checkpoint, or start over with --overwrite"
    )
