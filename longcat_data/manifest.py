"""The records beside the shards: per-writer resume state and the merged ``manifest.json`` readers use.

On disk, in the output directory::

    manifest.json            the merged view readers use (format in docs/contracts.md)
    contact_sheet.png        start frames and captions, when longcat-prep inspect made it
    .prep/{stream}.json      resume state of one writer ("stream" = its shard-name prefix)
    .prep/merge.lock         orders ranks that finish at the same time

Each writer (``longcat_data.writer``) keeps its own state; ``merge_manifest`` folds all states into
``manifest.json`` under the file lock, so whichever rank finishes last writes the complete one.
``check_compatible`` refuses to add to a directory made with other encoders or settings; on the reading
side ``find_manifest`` and ``check_manifest`` do the same for training.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longcat_data.files import read_json, write_json_atomic
from longcat_data.shards import ShardError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = ".prep"
CONTACT_SHEET = (
    "contact_sheet.png"  # written by longcat-prep inspect; pushed and shown on the card when present
)


class OutputMismatch(RuntimeError):
    """The output directory holds shards made with other encoders or settings."""


@dataclass
class ShardRecord:
    name: str
    samples: int
    bytes: int
    keys: list[str]
    inputs: dict[str, str]  # input key -> source path, for inputs whose last clip is in this shard
    buckets: dict[str, int]


@dataclass
class StreamState:
    stream: str
    rank: int
    world_size: int
    listing: str
    settings: dict[str, Any]
    encoders: dict[str, Any]
    shards: list[ShardRecord] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    complete: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamState:
        fields = {k: v for k, v in d.items() if k != "version"}
        fields["shards"] = [ShardRecord(**s) for s in d["shards"]]
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}


def listing_digest(keys: Iterable[str]) -> str:
    """Identifies the full input listing, so ranks of one run can tell their states from stale ones."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences ``name: old -> new`` between two flat-ish config dicts."""
    diffs = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, "<unset>"), new.get(name, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += config_diff(a, b, f"{prefix}{name}.")
        elif a != b:
            diffs.append(f"{prefix}{name}: {a!r} -> {b!r}")
    return diffs


def read_manifest(out_dir: str | Path) -> dict | None:
    return read_json(Path(out_dir) / MANIFEST)


def state_path(out_dir: Path, stream: str) -> Path:
    return out_dir / STATE_DIR / f"{stream}.json"


def read_states(out_dir: str | Path) -> list[StreamState]:
    paths = sorted((Path(out_dir) / STATE_DIR).glob("*.json"))
    return [StreamState.from_dict(d) for d in map(read_json, paths) if d is not None]


def check_compatible(out_dir: str | Path, settings: Mapping[str, Any], encoders: Mapping[str, Any]) -> None:
    """Refuse to add to an output directory whose shards came from other encoders or settings."""
    out_dir = Path(out_dir)
    existing = [(MANIFEST, read_manifest(out_dir))]
    existing += [(f"{STATE_DIR}/{s.stream}.json", s.to_dict()) for s in read_states(out_dir)]
    for source, old in existing:
        if old is None:
            continue
        diffs = config_diff(
            {"encoders": old["encoders"], "settings": old["settings"]},
            {"encoders": dict(encoders), "settings": dict(settings)},
        )
        if diffs:
            raise OutputMismatch(
                f"{out_dir} already holds shards made differently ({source}): {'; '.join(diffs)}. "
                f"Use a new output directory, or rerun with the original --model and settings."
            )


# ---------------------------------------------------------------- merge


def _runs_complete(states: list[StreamState]) -> bool:
    """True when every rank of some run (same world size and input listing) finished."""
    finished: dict[tuple[int, str], set[int]] = {}
    for s in states:
        if s.complete:
            finished.setdefault((s.world_size, s.listing), set()).add(s.rank)
    return any(len(ranks) == world for (world, _), ranks in finished.items())


def build_manifest(states: list[StreamState]) -> dict[str, Any]:
    """The merged manifest of all streams (pure): shards, bucket counts, rejections, completeness."""
    if not states:
        raise ValueError("no prep state to merge")
    first = states[0]
    for s in states[1:]:
        diffs = config_diff(
            {"encoders": first.encoders, "settings": first.settings},
            {"encoders": s.encoders, "settings": s.settings},
        )
        if diffs:
            raise OutputMismatch(f"streams {first.stream} and {s.stream} differ: {'; '.join(diffs)}")
    records = sorted((r for s in states for r in s.shards), key=lambda r: r.name)
    buckets: Counter[str] = Counter()
    written_sources: set[str] = set()
    for r in records:
        buckets.update(r.buckets)
        written_sources.update(r.inputs.values())
    # One entry per source; an input that a later run wrote after all is no longer rejected.
    rejected = {}
    for s in states:
        for entry in s.rejected:
            if entry["source"] not in written_sources:
                rejected[entry["source"]] = entry
    return {
        "version": FORMAT_VERSION,
        "settings": first.settings,
        "encoders": first.encoders,
        "shards": [{"name": r.name, "samples": r.samples, "bytes": r.bytes} for r in records],
        "buckets": dict(sorted(buckets.items())),
        "rejected": [rejected[k] for k in sorted(rejected)],
        "complete": _runs_complete(states),
    }


def merge_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Fold every stream's state into ``manifest.json``; the lock orders concurrent finishing ranks."""
    out_dir = Path(out_dir)
    lock_path = out_dir / STATE_DIR / "merge.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = build_manifest(read_states(out_dir))
        missing = [s["name"] for s in manifest["shards"] if not (out_dir / s["name"]).exists()]
        if missing:
            log.warning("manifest lists shards not (yet) on disk: %s", ", ".join(missing))
        write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- reading side


def manifest_shards(directory: Path, *, allow_missing: bool = False) -> list[str] | None:
    """Paths of the shards ``directory``'s manifest lists, or None without a manifest. A listed shard
    that is not there is a ShardError naming it, or with ``allow_missing`` a warning and left out."""
    # The manifest lists finished shards; a half-written one from a running prep must not be read.
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    names = [s["name"] for s in manifest.get("shards", [])]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        what = f"{directory}/{MANIFEST} lists {len(names)} shards, {len(missing)} of them missing"
        first = f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
        if not allow_missing:
            raise ShardError(
                f"{what} ({first}): re-run `longcat-prep shard VIDEOS {directory}` with the same settings "
                f"(it encodes the missing shards' clips again), or train on the rest with --allow-missing-shards"
            )
        log.warning("%s (%s): training on the other %d", what, first, len(names) - len(missing))
    return [str(directory / n) for n in names if n not in missing]


def find_manifest(urls: Sequence[str]) -> dict | None:
    """The ``manifest.json`` beside the first local shard, or None for remote shards without one."""
    first = urls[0]
    if "://" in first or first.startswith("pipe:"):
        return None
    return read_manifest(Path(first).expanduser().parent)


def check_manifest(
    manifest: dict, *, encoders: dict | None, frames: int | None, where: str = "shards"
) -> None:
    """Raise ShardError when the shards were made with other encoders or another frame count."""
    made_by = manifest.get("encoders")
    if encoders is not None and made_by and made_by != encoders:
        diff = sorted(k for k in set(encoders) | set(made_by) if encoders.get(k) != made_by.get(k))
        raise ShardError(
            f"{where} were encoded with other encoders than --model (differ in {', '.join(diff)}: "
            f"{made_by.get(diff[0])!r} vs {encoders.get(diff[0])!r}); re-run longcat-prep shard"
        )
    # Prep trims short videos to fewer frames (their own buckets); what must match is its --frames.
    made = manifest.get("settings", {}).get("frames")
    if made is None and manifest.get("buckets"):
        made = max(int(k.rsplit("x", 1)[-1]) for k in manifest["buckets"])
    if frames is not None and made is not None and made != frames:
        raise ShardError(
            f"{where} were made with --frames {made} but the config trains on {frames} frames; "
            f"set frames = {made} or re-run longcat-prep shard --frames {frames}"
        )
    if manifest.get("complete") is False:
        log.warning("%s: manifest says prep did not finish; training on the shards written so far", where)
