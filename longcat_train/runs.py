"""The output folder of a training run: the files a run writes there, its checkpoints by step, and the
rules for starting in a folder that already holds a run.

Layout of ``output_dir``: ``checkpoints/step-NNNNNNN/`` (``longcat_train.checkpoints``),
``train_config.json``, ``lora.safetensors`` + ``lora_longcat.safetensors``, ``metrics.jsonl``,
``validation/``, ``tensorboard/`` (and ``text_embeds.safetensors``, a cache any run may reuse).

- A fresh run (no ``resume``) in a folder holding a run is refused, or with ``overwrite`` starts after
  deleting the run's files (those above, nothing else).
- Resuming at step k drops what came after k: the ``metrics.jsonl`` lines of later steps, and later
  checkpoints (renamed ``step-N.superseded``, never listed again), so the folder tells one history.

Imports no torch: the command line reads the saved config of the run it resumes before anything loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from longcat_data.files import write_atomic
from longcat_data.flags import ConfigError, canonical_keys
from longcat_train.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "train_config.json"
LORA_FILE = "lora.safetensors"
OFFICIAL_LORA_FILE = "lora_longcat.safetensors"
COMFYUI_LORA_FILE = "lora_comfyui.safetensors"  # the ComfyUI-WanVideoWrapper layout (lora_formats)
METRICS_FILE = "metrics.jsonl"
# What a run writes into output_dir: what marks a folder as holding a run, and all that overwrite deletes.
RUN_FOLDERS = (CHECKPOINTS, "validation", "tensorboard")
RUN_FILES = (CONFIG_FILE, LORA_FILE, OFFICIAL_LORA_FILE, COMFYUI_LORA_FILE, METRICS_FILE)
# Per-invocation settings: never taken over from the run being resumed.
INVOCATION_KEYS = frozenset({"resume", "overwrite"})

_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


# Keys that may change between a run and its resume: where things go and how often things happen, not
# what the model sees. Everything else must match the checkpoint.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "resume",
        "max_train_steps",
        "num_train_epochs",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "overwrite",
        "allow_missing_shards",
    }
    | {"report_to", "wandb_project", "progress", "pin_memory"}
    # The memory plan's settings choose what is kept for backward, not what is computed: a run stopped for
    # memory resumes under another budget.
    | {"memory_budget", "plan", "gpu_memory", "area"}
    | {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("validation_")}
)


def resume_mismatch(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """``key: saved -> current`` for every key that differs and would change the training trajectory.

    ``saved`` may come from an older version that named some keys differently (their aliases today)."""
    saved = canonical_keys(TrainConfig, saved)
    now = current.to_dict()
    # Only keys the saved run had: a setting added since then kept its default behaviour there.
    return [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        for k in sorted(set(saved) & set(now))
        if k not in RESUMABLE_CHANGES and _normal(saved[k]) != _normal(now[k])
    ]


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def checkpoint_step(path: Path) -> int | None:
    """N of a checkpoint folder ``step-N`` (None for anything else, e.g. ``step-N.partial``)."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders ``root/step-N``, oldest first; whether each is intact is
    ``checkpoints.checkpoint_problem``'s to say."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def resume_candidates(cfg: TrainConfig) -> list[Path]:
    """Checkpoints ``cfg.resume`` names, newest first: for ``latest`` those in ``output_dir`` (none yet:
    empty, a fresh start); for a checkpoint folder that one alone; for an output or ``checkpoints``
    folder the ones in it (ConfigError when it holds none)."""
    if cfg.resume is None:
        return []
    if cfg.resume == "latest":
        return list_checkpoints(Path(cfg.output_dir) / CHECKPOINTS)[::-1]
    path = Path(cfg.resume).expanduser()
    if checkpoint_step(path) is not None or (path / "state.json").is_file():
        return [path]
    found = list_checkpoints(path / CHECKPOINTS) or list_checkpoints(path)
    if not found:
        raise ConfigError(f"resume = {cfg.resume!r}: no checkpoint (checkpoints/step-N) in {path}")
    return found[::-1]


def read_saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The ``train_config.json`` of a checkpoint with today's key names, or None when unreadable."""
    try:
        values = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return canonical_keys(TrainConfig, values) if isinstance(values, dict) else None


def resume_base(cfg: TrainConfig) -> dict[str, Any] | None:
    """The values a resumed run starts from: the saved config of the newest checkpoint ``cfg.resume``
    names whose config reads (its own invocation settings and keys unknown today left out), or None
    when there is none (a fresh start). For ``latest`` the output folder is the one searched, and its
    own ``train_config.json`` is the base when no checkpoint has one."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # Stopped before its first checkpoint, a run has only the config it saved at the start: resuming
    # it starts it again with those settings (what the refusal of a used output_dir suggests).
    run_config = [Path(cfg.output_dir)] if cfg.resume == "latest" else []
    for checkpoint in [*resume_candidates(cfg), *run_config]:
        saved = read_saved_config(checkpoint)
        if saved is None:
            continue
        unknown = sorted(set(saved) - fields)
        if unknown:
            log.info("resume: saved keys this version does not know, ignored: %s", ", ".join(unknown))
        base = {k: v for k, v in saved.items() if k in fields and k not in INVOCATION_KEYS}
        if cfg.resume == "latest":
            base["output_dir"] = cfg.output_dir
        return base
    return None


def run_files(out: Path) -> list[str]:
    """The names of a run's files and folders present in ``out``."""
    return [name for name in (*RUN_FOLDERS, *RUN_FILES) if (out / name).exists()]


def used_output(cfg: TrainConfig, *, resuming: bool) -> list[str]:
    """The run files in ``output_dir`` that ``overwrite`` deletes (:func:`clear_run`): none when
    resuming, which continues the folder's run. ConfigError when the folder holds a run and neither
    ``resume`` nor ``overwrite`` says what to do with it."""
    out = Path(cfg.output_dir)
    found = [] if resuming else run_files(out)
    if found and not cfg.overwrite:
        raise ConfigError(
            f"output_dir {out} already holds a run ({', '.join(found)}): continue it with --resume latest, "
            f"or start over with --overwrite (deletes those), or pick another --output-dir"
        )
    return found


def clear_run(out: Path, names: list[str]) -> None:
    """Delete the run files ``names`` (from :func:`used_output`) of ``out``."""
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if names:
        log.info("overwrite: deleted %s from %s", ", ".join(names), out)


def drop_after(out: Path, step: int) -> None:
    """Resuming at ``step``: drop the metrics lines of later steps (and torn lines a kill left) and
    rename later checkpoints to ``step-N.superseded``."""
    for checkpoint in list_checkpoints(out / CHECKPOINTS):
        if checkpoint_step(checkpoint) > step:
            aside = checkpoint.with_name(checkpoint.name + ".superseded")
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)
            log.warning("resume at step %d: %s is from after it, renamed %s", step, checkpoint, aside.name)
    metrics = out / METRICS_FILE
    if not metrics.is_file():
        return
    lines = metrics.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _metrics_step(line) is not None and _metrics_step(line) <= step]
    if len(kept) != len(lines):
        write_atomic(metrics, "".join(f"{line}\n" for line in kept))


def _metrics_step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that a kill part-way leaves no half-deleted ``step-N``: renamed
    first, then removed."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
