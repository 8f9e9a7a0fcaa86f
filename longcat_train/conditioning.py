"""What a training sample is conditioned on: the tasks, their weights, and the condition latent frames.

A task says which leading latent frames of a clip are given clean (timestep 0, left out of the loss):

- ``i2v``: one, the start frame's latent the shard holds (``cond.safetensors``);
- ``continuation``: the first ``latent_frames(cond_frames)`` latents of the clip itself. The VAE is
  causal, so they are exactly what encoding the clip's first ``cond_frames`` frames alone gives: what the
  official continuation pipeline encodes from the video it continues;
- ``t2v``: none.

``--conditioning`` picks one task for every sample, or ``mixed``: each sample draws its task with the
weights of ``--conditioning-mix``. Parsing and the weights are pure and import no torch (the config
checks use them before anything loads); the draw itself is ``draw_tasks``, from the trainer's seeded
generator, so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longcat_data.buckets import VAE_TEMPORAL_STRIDE, latent_frames
from longcat_data.flags import Check

if TYPE_CHECKING:
    import torch

TASKS = ("i2v", "continuation", "t2v")
CONDITIONINGS = ("i2v", "t2v", "continuation", "mixed")
VALIDATION_CONDITIONINGS = ("auto", "i2v", "continuation")
DEFAULT_MIX = "i2v=0.6,continuation=0.3,t2v=0.1"


def parse_mix(text: str) -> dict[str, float]:
    """``"i2v=0.6,continuation=0.3,t2v=0.1"`` -> ``{task: weight}`` (tasks left out weigh 0).

    ValueError (one line, the fix) for an unknown task, a task named twice, a weight that is not a
    finite number >= 0, or weights that sum to 0."""
    weights: dict[str, float] = {}
    for part in str(text).split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{part.strip()!r} is not TASK=WEIGHT (e.g. {DEFAULT_MIX})")
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}: the tasks are {', '.join(TASKS)}")
        if name in weights:
            raise ValueError(f"task {name!r} is named twice")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{name}={value.strip()!r}: the weight is not a number") from None
        if not (weight >= 0 and weight != float("inf")):
            raise ValueError(f"{name}={value.strip()}: a weight is a finite number >= 0")
        weights[name] = weight
    if sum(weights.values()) <= 0:
        raise ValueError(
            f"the weights sum to 0: give at least one task a positive weight (e.g. {DEFAULT_MIX})"
        )
    return {task: weights.get(task, 0.0) for task in TASKS}


def _parses(text: str) -> bool:
    parse_mix(text)
    return True


CONDITIONING_MIX = Check(
    _parses,
    f"TASK=WEIGHT,... with tasks among {', '.join(TASKS)}, each once, weights >= 0 summing to more than 0 "
    f"(e.g. {DEFAULT_MIX})",
)


def task_weights(conditioning: str, mix: str) -> dict[str, float]:
    """The tasks a run trains and their weights (> 0 only): one task at weight 1, or the mix's."""
    if conditioning == "mixed":
        return {task: w for task, w in parse_mix(mix).items() if w > 0}
    return {conditioning: 1.0}


def cond_latent_count(task: str, cond_frames: int) -> int:
    """Leading latent frames given clean for ``task``."""
    return {"i2v": 1, "continuation": latent_frames(cond_frames), "t2v": 0}[task]


def needs_start_frame(weights: Mapping[str, float]) -> bool:
    """Whether samples must carry the start-frame latent (``cond.safetensors``): i2v is drawn."""
    return "i2v" in weights


def min_clip_frames(weights: Mapping[str, float], cond_frames: int) -> int | None:
    """The fewest frames a clip may have: the continuation condition plus one latent frame to train
    (None when continuation is not drawn)."""
    if "continuation" not in weights:
        return None
    return cond_frames + VAE_TEMPORAL_STRIDE


def min_latent_frames(weights: Mapping[str, float], cond_frames: int) -> int | None:
    """``min_clip_frames`` in latent frames (what a shard sample's header tells)."""
    frames = min_clip_frames(weights, cond_frames)
    return latent_frames(frames) if frames else None


def draw_tasks(weights: Mapping[str, float], count: int, generator: torch.Generator) -> list[str]:
    """``count`` tasks, each drawn with ``weights`` (normalised) from ``generator``; a single task is
    returned without drawing, so a one-task run uses the generator exactly as before tasks existed."""
    import torch

    tasks = list(weights)
    if len(tasks) == 1:
        return tasks * count
    probabilities = torch.tensor([weights[t] for t in tasks], dtype=torch.float64)
    cumulative = (probabilities / probabilities.sum()).cumsum(0)
    draws = torch.rand(count, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    index = torch.searchsorted(cumulative, draws, right=True).clamp(max=len(tasks) - 1)
    return [tasks[i] for i in index.tolist()]


def task_groups(tasks: Sequence[str]) -> list[tuple[str, list[int]]]:
    """The sample indices of each task, tasks in ``TASKS`` order: one forward pass per group, since
    every sample of a model call has the same number of condition frames."""
    return [(task, [i for i, t in enumerate(tasks) if t == task]) for task in TASKS if task in tasks]


def sub_batch(batch: Mapping[str, Any], indices: list[int]) -> dict[str, Any]:
    """The samples ``indices`` of a stream batch (tensors indexed on dim 0, lists picked); the whole
    batch itself when ``indices`` covers it."""
    size = len(batch["latents"])
    if indices == list(range(size)):
        return dict(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, list):
            out[key] = [value[i] for i in indices]
        elif hasattr(value, "shape") and value.shape[:1] == (size,):
            out[key] = value[indices]
        else:
            out[key] = value
    return out


def condition_latents(task: str, batch: Mapping[str, Any], cond_frames: int) -> torch.Tensor | None:
    """The clean condition latents [B, 16, n, h, w] of ``task`` for a stream batch, or None (t2v)."""
    if task == "t2v":
        return None
    if task == "i2v":
        return batch["cond_latents"]
    return batch["latents"][:, :, : cond_latent_count(task, cond_frames)]


def check_clip_lengths(
    weights: Mapping[str, float], cond_frames: int, manifest: dict, directory: str | Path
) -> None:
    """ShardError naming a shard whose clips are too short for the continuation condition, from the
    manifest's bucket counts and the prep states (before any shard is read)."""
    from longcat_data.manifest import short_clips
    from longcat_data.shards import ShardError

    shortest = min_clip_frames(weights, cond_frames)
    found = short_clips(manifest, directory, shortest) if shortest else []
    if found:
        shard, frames, clips = min(found, key=lambda entry: entry[1])  # the fix must fit the shortest
        more = f" (and {len(found) - 1} more like it)" if len(found) > 1 else ""
        raise ShardError(
            f"{directory / shard if shard else directory} holds {clips} clip(s) of {frames} frames{more}: "
            f"too few for continuation with cond_frames = {cond_frames}, which needs {shortest}; set "
            f"cond_frames <= {frames - VAE_TEMPORAL_STRIDE}, or re-run longcat-prep shard without videos "
            "that short"
        )
