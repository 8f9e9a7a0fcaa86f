"""The records beside the shards: per-writer resume state and the merged ``manifest.json`` readers use.

On disk, in the output directory::

    manifest.json            the merged view readers use (format in docs/contracts.md)
    contact_sheet.png        start frames and captions, when longcat-prep inspect made it
    .prep/{stream}.json      resume state of one writer ("stream" = its shard-name prefix)
    .prep/{stream}.lock      held by the live writer of that stream (``longcat_data.locks``)
    .prep/merge.lock         orders ranks that finish at the same time

Each writer (``longcat_data.writer``) keeps its own state; ``merge_manifest`` folds all states into
``manifest.json`` under the file lock, so whichever rank finishes last writes the complete one, and
``complete`` is only written true once every listed shard is on disk with the recorded sample count and
size (``verify_shards``). ``check_compatible`` refuses to add to a directory made with other encoders or
settings; on the reading side ``find_manifest`` and ``check_manifest`` do the same for training.
A manifest or state that cannot be read or has the wrong shape is a ``RecordError`` naming the file and
the fix.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longcat_data import storage
from longcat_data.buckets import MIN_FRAMES, floor_4k_plus_1
from longcat_data.files import FileFormatError
from longcat_data.locks import STALE_SECONDS, Holder
from longcat_data.object_locks import ObjectLock
from longcat_data.shards import ShardError
from longcat_data.storage import Folder
from longcat_data.tars import stream_keys

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = ".prep"
CONTACT_SHEET = (
    "contact_sheet.png"  # written by longcat-prep inspect; pushed and shown on the card when present
)


class OutputMismatch(RuntimeError):
    """The output directory holds shards made with other encoders or settings."""


class RecordError(ShardError):
    """``manifest.json`` or a prep state that cannot be used as it is; the message says how to repair it."""


def _check_fields(
    value: Any, fields: Mapping[str, type | tuple[type, ...]], where: str, *, required: bool, at: str = ""
) -> None:
    """FileFormatError "``where``: ``at``NAME is str, expected int" for the first field of another type
    (or missing, when ``required``); bool does not count as int."""
    if not isinstance(value, dict):
        raise FileFormatError(
            f"{where}: {at.rstrip('.') or 'the content'} is {type(value).__name__}, expected an object"
        )
    for name, kind in fields.items():
        if name not in value:
            if required:
                raise FileFormatError(f"{where}: {at}{name} is missing")
            continue
        got = value[name]
        if not isinstance(got, kind) or (isinstance(got, bool) and kind is int):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise FileFormatError(f"{where}: {at}{name} is {type(got).__name__}, expected {expected}")


def _check_items(value: dict | list, item: type, where: str, at: str) -> None:
    """FileFormatError unless every value (and every key of a dict, as a str) has the right type."""
    keys = value.keys() if isinstance(value, dict) else ()
    values = value.values() if isinstance(value, dict) else value
    good = all(isinstance(k, str) for k in keys) and all(
        isinstance(v, item) and not (isinstance(v, bool) and item is int) for v in values
    )
    if not good:
        raise FileFormatError(f"{where}: {at} holds other things than {item.__name__}s")


RECORD_FIELDS = {"name": str, "samples": int, "bytes": int, "keys": list, "inputs": dict, "buckets": dict}
STATE_FIELDS = {
    "stream": str,
    "rank": int,
    "world_size": int,
    "listing": str,
    "settings": dict,
    "encoders": dict,
    "shards": list,
    "rejected": list,
    "complete": bool,
}
MANIFEST_FIELDS = {
    "version": int,
    "settings": dict,
    "encoders": dict,
    "shards": list,
    "buckets": dict,
    "rejected": list,
    "complete": bool,
}


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
    def from_dict(cls, d: Any, what: str = "prep state") -> StreamState:
        """The state ``to_dict`` wrote; FileFormatError naming the first field of the wrong type."""
        _check_fields(d, STATE_FIELDS, what, required=True)
        shards = []
        for i, s in enumerate(d["shards"]):
            at = f"shards[{i}]"
            _check_fields(s, RECORD_FIELDS, what, required=True, at=f"{at}.")
            _check_items(s["keys"], str, what, f"{at}.keys")
            _check_items(s["inputs"], str, what, f"{at}.inputs")
            _check_items(s["buckets"], int, what, f"{at}.buckets")
            shards.append(ShardRecord(**{k: s[k] for k in RECORD_FIELDS}))
        for i, entry in enumerate(d["rejected"]):
            _check_fields(entry, {"source": str, "reason": str}, what, required=True, at=f"rejected[{i}].")
        return cls(**{k: d[k] for k in STATE_FIELDS if k != "shards"}, shards=shards)

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


def read_manifest(out_dir: str | Path | Folder) -> dict | None:
    """``manifest.json`` (None when there is none); RecordError when it is unreadable or misshapen.

    Fields a reader needs are type-checked; missing ones are allowed (hand-written or older manifests).
    """
    store = storage.folder(out_dir)
    path = store.url(MANIFEST)
    out_dir = store.url()
    try:
        manifest = storage.read_json_in(store, MANIFEST)
        if manifest is not None:
            _check_fields(manifest, MANIFEST_FIELDS, str(path), required=False)
            for i, shard in enumerate(manifest.get("shards", [])):
                _check_fields(shard, {"name": str}, str(path), required=True, at=f"shards[{i}].")
                _check_fields(
                    shard, {"samples": int, "bytes": int}, str(path), required=False, at=f"shards[{i}]."
                )
    except FileFormatError as err:
        raise RecordError(
            f"{err}; rebuild it from the prep states with `longcat-prep merge {out_dir}`"
        ) from err
    return manifest


def state_name(stream: str) -> str:
    """One writer's state, relative to the output folder."""
    return f"{STATE_DIR}/{stream}.json"


def state_path(out_dir: Path, stream: str) -> Path:
    return out_dir / state_name(stream)


def captions_cache_name(stream: str) -> str:
    """Where ``--captions qwen`` keeps the captions of one stream's videos, relative to the output."""
    return f"{STATE_DIR}/captions-{stream}.jsonl"


def captions_cache_path(out_dir: Path, stream: str) -> Path:
    return out_dir / captions_cache_name(stream)


def read_state(out_dir: str | Path | Folder, name: str) -> StreamState | None:
    """The state ``name`` (``state_name``) of an output folder (None when there is none); RecordError
    when it is unreadable or misshapen."""
    store = storage.folder(out_dir)
    try:
        data = storage.read_json_in(store, name)
        return None if data is None else StreamState.from_dict(data, store.url(name))
    except FileFormatError as err:
        raise RecordError(
            f"{err}; move it out of {store.url(STATE_DIR)} and re-run the longcat-prep shard command that "
            "wrote it (the shards it finished are read back from disk, nothing is encoded twice)"
        ) from err


def read_states(out_dir: str | Path | Folder) -> list[StreamState]:
    store = storage.folder(out_dir)
    names = store.names(f"{STATE_DIR}/*.json")
    return [state for state in (read_state(store, name) for name in names) if state is not None]


def check_compatible(
    out_dir: str | Path | Folder, settings: Mapping[str, Any], encoders: Mapping[str, Any]
) -> None:
    """Refuse to add to an output directory whose shards came from other encoders or settings."""
    out_dir = storage.folder(out_dir)
    existing = [(MANIFEST, read_manifest(out_dir))]
    existing += [(f"{STATE_DIR}/{s.stream}.json", s.to_dict()) for s in read_states(out_dir)]
    for source, old in existing:
        if old is None or ("encoders" not in old and "settings" not in old):
            continue
        diffs = config_diff(
            {"encoders": old.get("encoders", {}), "settings": old.get("settings", {})},
            {"encoders": dict(encoders), "settings": dict(settings)},
        )
        if diffs:
            raise OutputMismatch(
                f"{out_dir.url()} already holds shards made differently ({source}): {'; '.join(diffs)}. "
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


def verify_shards(
    directory: str | Path | Folder, shards: Sequence[Mapping[str, Any]], *, count_samples: bool
) -> list[str]:
    """One line per listed shard that is missing or differs from its record: size always, the sample
    count too with ``count_samples`` (reads every tar header, so meant for the end of a run)."""
    store = storage.folder(directory)
    # A remote folder is listed once: a request per shard, after every shard of a long run, would not scale.
    listed = store.top_sizes() if isinstance(store, storage.RemoteFolder) and shards else None
    problems = []
    for shard in shards:
        path = store.url(shard["name"])
        try:
            size = listed.get(shard["name"]) if listed is not None else store.size(shard["name"])
        except OSError as err:
            problems.append(f"{path} cannot be read ({err.strerror or err})")
            continue
        if size is None:
            problems.append(f"{path} is listed in {MANIFEST} but not on disk")
            continue
        if "bytes" in shard and size != shard["bytes"]:
            problems.append(f"{path} is {size} bytes, {MANIFEST} records {shard['bytes']}")
        elif count_samples and "samples" in shard:
            try:
                with store.open(shard["name"]) as f:
                    keys, damage = stream_keys(f)
            except OSError as err:
                problems.append(f"{path} cannot be read ({err.strerror or err})")
                continue
            if damage:
                problems.append(f"{path} is damaged ({damage[0].describe()})")
            elif len(keys) != shard["samples"]:
                problems.append(f"{path} holds {len(keys)} samples, {MANIFEST} records {shard['samples']}")
    return problems


def repair_hint(out_dir: str | Path | Folder) -> str:
    out_dir = storage.folder(out_dir).url()
    return (
        f"re-run longcat-prep shard into {out_dir} to encode its clips again, or `longcat-prep merge "
        f"{out_dir}` if the shards were replaced after the manifest was written"
    )


@contextlib.contextmanager
def merge_lock(store: Folder) -> Iterator[None]:
    """Held while a manifest is merged: ``.prep/merge.lock``, an flock (local) or a lock object."""
    if store.local is None:
        lock = ObjectLock(store, Holder.me("merge", 0, ""))
        # A merge takes seconds; only a killed merger's lock (taken over once stale) waits longer.
        lock.acquire(STALE_SECONDS + 60, refuse_other_runs=False)
        try:
            yield
        finally:
            lock.release()
        return
    lock_path = store.local / STATE_DIR / "merge.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def merge_manifest(out_dir: str | Path | Folder, *, count_samples: bool = True) -> dict[str, Any]:
    """Fold every stream's state into ``manifest.json``; the lock orders concurrent finishing ranks.

    ``complete`` is true only when the shards on disk match the records (``verify_shards``; with
    ``count_samples`` False only their sizes are compared, for the merges in the middle of a run).
    The manifest is written last, after the shards and states it lists.
    """
    store = storage.folder(out_dir)
    with merge_lock(store):
        states = read_states(store)
        if not states:
            raise RecordError(
                f"no prep state in {store.url(STATE_DIR)}; run longcat-prep shard into {store.url()}"
            )
        manifest = build_manifest(states)
        problems = verify_shards(
            store, manifest["shards"], count_samples=count_samples and manifest["complete"]
        )
        if problems:
            log.warning("%s (and %d more); %s", problems[0], len(problems) - 1, repair_hint(store))
            manifest["complete"] = False
        # Every writer of the manifest holds this lock, so a temporary of it now is a killed run's.
        for stray in store.temporaries(MANIFEST):
            store.remove(stray)
        store.write_atomic(MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


# ---------------------------------------------------------------- reading side


def manifest_shards(directory: str | Path | Folder, *, allow_missing: bool = False) -> list[str] | None:
    """Paths (URLs) of the shards ``directory``'s manifest lists, or None without a manifest. A listed
    shard that is not there is a ShardError naming it, or with ``allow_missing`` a warning and left out."""
    # The manifest lists finished shards; a half-written one from a running prep must not be read.
    store = storage.folder(directory)
    directory = store.url()
    manifest = read_manifest(store)
    if manifest is None:
        return None
    names = [s["name"] for s in manifest.get("shards", [])]
    missing = [n for n in names if not store.is_file(n)]
    if missing:
        what = f"{directory}/{MANIFEST} lists {len(names)} shards, {len(missing)} of them missing"
        first = f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
        if not allow_missing:
            raise ShardError(
                f"{what} ({first}): re-run `longcat-prep shard VIDEOS {directory}` with the same settings "
                f"(it encodes the missing shards' clips again), or train on the rest with --allow-missing-shards"
            )
        log.warning("%s (%s): training on the other %d", what, first, len(names) - len(missing))
    return [store.url(n) for n in names if n not in missing]


def manifest_folder(url: str) -> str | None:
    """The folder whose ``manifest.json`` describes shard ``url``: its parent, for a local path or a
    URL of a store fsspec can list; None for ``pipe:`` commands and plain web URLs."""
    if url.startswith("pipe:") or url.startswith(("http://", "https://")):
        return None
    if storage.is_remote(url) and not storage.knows_protocol(url):
        return None
    return storage.parent(url)


def find_manifest(urls: Sequence[str]) -> dict | None:
    """The ``manifest.json`` beside the first shard, or None where there is none (or cannot be)."""
    where = manifest_folder(urls[0])
    return None if where is None else read_manifest(where)


def short_clips(manifest: dict, directory: str | Path, min_frames: int) -> list[tuple[str | None, int, int]]:
    """``(shard, frames, clips)`` for the clips of fewer than ``min_frames`` frames the manifest's buckets
    count, each shard named from the prep states beside it (``None`` where no state records the bucket,
    e.g. shards copied without their ``.prep`` folder)."""

    def frames(bucket: str) -> int:
        return int(bucket.rsplit("x", 1)[-1])

    short = {k: n for k, n in manifest.get("buckets", {}).items() if frames(k) < min_frames}
    if not short:
        return []
    records = sorted((r for s in read_states(directory) for r in s.shards), key=lambda r: r.name)
    found: list[tuple[str | None, int, int]] = [
        (r.name, frames(k), n) for r in records for k, n in sorted(r.buckets.items()) if k in short
    ]
    recorded = {k for r in records for k in r.buckets}
    return found + [(None, frames(k), n) for k, n in sorted(short.items()) if k not in recorded]


def check_shard_folders(
    urls: Sequence[str], *, encoders: dict | None, frames: int | None, allow_missing: bool
) -> list[tuple[str, dict]]:
    """``check_manifest`` for the manifest of every folder ``urls`` come from (local or in a store), not
    only the first's: folders made with other frame counts or encoders do not train together. Returns
    (folder, manifest) of those that have one."""
    checked = []
    for directory in dict.fromkeys(d for d in map(manifest_folder, urls) if d is not None):
        manifest = read_manifest(directory)
        if manifest is not None:
            check_manifest(
                manifest,
                encoders=encoders,
                frames=frames,
                where=str(directory),
                directory=directory,
                allow_missing=allow_missing,
            )
            checked.append((directory, manifest))
    return checked


def made_frames(manifest: dict) -> int | None:
    """The clip length prep made the shards with: its ``--frames`` as a 4k+1 count (shards written before
    prep rounded it stored the value typed), else the longest bucket; None when the manifest has neither.
    Shorter clips (short videos, kept at their own length) are in buckets of their own."""
    made = manifest.get("settings", {}).get("frames")
    if isinstance(made, int) and made >= MIN_FRAMES:
        return floor_4k_plus_1(made)
    if manifest.get("buckets"):
        return max(int(k.rsplit("x", 1)[-1]) for k in manifest["buckets"])
    return None


def check_manifest(
    manifest: dict,
    *,
    encoders: dict | None,
    frames: int | None,
    where: str = "shards",
    directory: str | Path | Folder | None = None,
    allow_missing: bool = False,
) -> None:
    """Raise ShardError when the shards were made with other encoders or another frame count, or (given
    the manifest's ``directory``) when a listed shard is not the size recorded, or missing (unless
    ``allow_missing``: ``manifest_shards`` has warned about those and left them out)."""
    if directory is not None:
        store = storage.folder(directory)
        shards = manifest.get("shards", [])
        if allow_missing:
            shards = [s for s in shards if store.is_file(s["name"])]
        problems = verify_shards(directory, shards, count_samples=False)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ShardError(f"{problems[0]}{more}; {repair_hint(directory)}")
    made_by = manifest.get("encoders")
    if encoders is not None and made_by and made_by != encoders:
        diff = sorted(k for k in set(encoders) | set(made_by) if encoders.get(k) != made_by.get(k))
        raise ShardError(
            f"{where} were encoded with other encoders than --model (differ in {', '.join(diff)}: "
            f"{made_by.get(diff[0])!r} vs {encoders.get(diff[0])!r}); re-run longcat-prep shard"
        )
    made = made_frames(manifest)
    if frames is not None and made is not None and made != frames:
        raise ShardError(
            f"{where} were made with --frames {made} but the config trains on {frames} frames; leave "
            f"frames unset to train on their {made}, or re-run longcat-prep shard --frames {frames}"
        )
    if manifest.get("complete") is False:
        log.warning("%s: manifest says prep did not finish; training on the shards written so far", where)
