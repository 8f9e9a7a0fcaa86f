"""Training checkpoints: what makes a resume exact, written atomically, and found again.

``checkpoints/step-N`` holds the LoRA weights (fp32, in both file formats), the optimizer state, every RNG
each process draws from (torch CPU and CUDA, the noise generator, numpy, python), the config, and the
train state: the step and the stream position (micro-batches each rank consumed). The data order is a
function of (seed, epoch, rank, worker), so a loader restarted at that position yields exactly the
batches the uninterrupted run would have. A checkpoint is written into ``step-N.partial`` and renamed
once every rank is done, so a listed checkpoint is always whole.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from longcat_train import lora, parallel
from longcat_train.config import ConfigError, TrainConfig, resume_mismatch, save_config
from longcat_train.parallel import Dist
from longcat_train.techniques import LoraFile

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "train_config.json"
LORA_FILE = "lora.safetensors"
OFFICIAL_LORA_FILE = "lora_longcat.safetensors"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches this rank consumed: the stream position
    samples: int = 0  # samples consumed by all ranks together
    skipped_steps: int = 0  # updates dropped by the NaN/inf guard
    world_size: int = 1


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / CHECKPOINTS


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a half-written one is still named ``step-N.partial``)."""
    return sorted(
        p
        for p in root.glob("step-*")
        if p.is_dir() and not p.name.endswith(".partial") and (p / "state.json").is_file()
    )


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: the newest in ``output_dir`` for ``latest``, else the given one."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = list_checkpoints(checkpoint_root(cfg))
        if not found:
            log.info("resume: no checkpoint in %s yet, starting from scratch", checkpoint_root(cfg))
            return None
        return found[-1]
    path = Path(cfg.resume).expanduser()
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path / CHECKPOINTS) or list_checkpoints(path)
    if not found:
        raise ConfigError(f"resume: no checkpoint in {path}")
    return found[-1]


def check_resumable(path: Path, cfg: TrainConfig, d: Dist) -> None:
    saved = json.loads((path / CONFIG_FILE).read_text())
    diffs = resume_mismatch(saved, cfg)
    if diffs:
        raise ConfigError(f"cannot resume from {path}: the config differs in {'; '.join(diffs)}")
    world = json.loads((path / "state.json").read_text())["world_size"]
    if world != d.world_size:
        raise ConfigError(
            f"cannot resume from {path}: it ran on {world} processes, this run has {d.world_size} "
            f"(the data order depends on it)"
        )


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
    """Write both LoRA files into ``directory`` (rank 0); gathering is a collective under FSDP."""
    weights = lora.lora_weights(parallel.trainable_state(train_model))
    if d.main:
        settings = lora.adapter_settings(model)
        lora.save_diffusers(weights, directory / LORA_FILE, settings)
        lora.save_official(weights, directory / OFFICIAL_LORA_FILE, settings)


def save_checkpoint(
    cfg: TrainConfig,
    state: TrainState,
    train_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    d: Dist,
) -> Path:
    """Write ``checkpoints/step-N`` atomically: into ``step-N.partial``, renamed when every rank is done."""
    root = checkpoint_root(cfg)
    final = root / f"step-{state.step:07d}"
    partial = final.with_name(final.name + ".partial")
    if d.main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    parallel.barrier(d)
    torch.save(rng_state(generator), partial / f"rng-rank{d.rank:05d}.pt")
    export_lora(train_model, model, partial, d)
    optim = parallel.optimizer_state(train_model, optimizer)
    if d.main:
        torch.save(optim, partial / "optimizer.pt")
        save_config(cfg, partial / CONFIG_FILE)
        (partial / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    parallel.barrier(d)
    if d.main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        kept = list_checkpoints(root)
        for old in kept[: -cfg.checkpoints_total_limit] if cfg.checkpoints_total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    parallel.barrier(d)
    return final


def load_checkpoint(path: Path, d: Dist) -> tuple[TrainState, LoraFile, dict, dict]:
    """The state, the LoRA weights (for ``apply_techniques``), the optimizer and this rank's RNG states."""
    lora_file = lora.read_lora(path / LORA_FILE)
    state = TrainState(**json.loads((path / "state.json").read_text()))
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng-rank{d.rank:05d}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False)
    log.info("resuming from %s at step %d (%d samples seen)", path, state.step, state.samples)
    return state, lora_file, optim, rng
