"""Shard writing: the sample schema, size-rolled atomic tars, per-rank resume state, the merged manifest.

On disk, in the output directory::

    train-000000.tar ...          finished shards (one writer: ``--world-size 1``)
    train-r{rank}-000000.tar ...  finished shards of rank ``rank`` when the work is split over ranks
    *.tar.partial                 the shard being written; renamed to its final name once complete
    manifest.json                 the merged view readers use (format in docs/contracts.md)
    .prep/{stream}.json           resume state of one writer ("stream" = its shard-name prefix)

A writer owns one stream, so ranks never touch each other's files. Its state lists every finished shard
with the clip keys and input keys inside it; it is rewritten (atomically) *before* a finished tar is
renamed to its final name, so a visible ``.tar`` is always recorded and a crash can lose at most the
``.partial`` shard in progress. On restart the writer renames a recorded-but-unrenamed partial, deletes
unrecorded ones, and skips inputs found in any stream's finished shards. ``merge_manifest`` folds all
states into ``manifest.json`` under a file lock, so whichever rank finishes last writes the complete one.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from webdataset import TarWriter

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = ".prep"
PARTIAL = ".partial"
DEFAULT_SHARD_BYTES = 1_000_000_000
LATENT_CHANNELS = 16

# Members of one sample, keyed like webdataset does: the part of the tar member name after the key.
LATENTS = "latents.safetensors"
COND = "cond.safetensors"
COND_IMAGE = "cond.png"
CAPTION = "txt"
TEXT_EMBEDS = "t5.safetensors"
META = "json"


class OutputMismatch(RuntimeError):
    """The output directory holds shards made with other encoders or settings."""


# ---------------------------------------------------------------- sample schema


def _tensor_bytes(name: str, tensor: torch.Tensor) -> bytes:
    return save_safetensors({name: tensor.detach().to("cpu", torch.bfloat16).contiguous()})


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_sample(
    key: str,
    latents: torch.Tensor,
    cond_latents: torch.Tensor,
    cond_image: np.ndarray,
    caption: str,
    meta: Mapping[str, Any],
    text_embeds: torch.Tensor | None = None,
) -> dict[str, bytes | str]:
    """One clip as webdataset members: tensors stored bf16, the start frame as PNG, meta as JSON."""
    if latents.ndim != 4 or latents.shape[0] != LATENT_CHANNELS:
        raise ValueError(f"latents must be [16, T, h, w], got {tuple(latents.shape)}")
    if tuple(cond_latents.shape) != (LATENT_CHANNELS, 1, *latents.shape[2:]):
        raise ValueError(f"cond_latents must be [16, 1, h, w] matching latents, got {tuple(cond_latents.shape)}")
    if cond_image.dtype != np.uint8 or cond_image.ndim != 3 or cond_image.shape[2] != 3:
        raise ValueError(f"cond_image must be uint8 [H, W, 3], got {cond_image.dtype} {cond_image.shape}")
    if not re.fullmatch(r"[^.\s]+", key):
        raise ValueError(f"sample key {key!r} must be non-empty without dots or spaces (webdataset splits on '.')")
    sample: dict[str, bytes | str] = {
        "__key__": key,
        LATENTS: _tensor_bytes("latents", latents),
        COND: _tensor_bytes("cond_latents", cond_latents),
        COND_IMAGE: _png_bytes(cond_image),
        CAPTION: caption.encode("utf-8"),
        META: json.dumps(dict(meta), ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }
    if text_embeds is not None:
        if text_embeds.ndim != 2:
            raise ValueError(f"text_embeds must be [L, D], got {tuple(text_embeds.shape)}")
        sample[TEXT_EMBEDS] = _tensor_bytes("embeds", text_embeds)
    return sample


def decode_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Raw members (as webdataset yields them, bytes per extension) -> tensors, image, caption, meta."""
    embeds = sample.get(TEXT_EMBEDS)
    return {
        "key": sample["__key__"],
        "latents": load_safetensors(sample[LATENTS])["latents"],
        "cond_latents": load_safetensors(sample[COND])["cond_latents"],
        "cond_image": np.asarray(Image.open(io.BytesIO(sample[COND_IMAGE])).convert("RGB")),
        "caption": sample[CAPTION].decode("utf-8"),
        "text_embeds": None if embeds is None else load_safetensors(embeds)["embeds"],
        "meta": json.loads(sample[META]),
    }


def bucket_name(height: int, width: int, frames: int) -> str:
    return f"{height}x{width}x{frames}"


# ---------------------------------------------------------------- small pure helpers

def stream_name(rank: int, world_size: int) -> str:
    """Shard-name prefix of one writer: ``train`` alone, ``train-r{rank}`` when split over ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return "train" if world_size == 1 else f"train-r{rank}"


def shard_filename(stream: str, index: int) -> str:
    return f"{stream}-{index:06d}.tar"


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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file next to ``path``, fsync, rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def read_manifest(out_dir: str | Path) -> dict | None:
    return read_json(Path(out_dir) / MANIFEST)


# ---------------------------------------------------------------- resume state


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
        diffs = config_diff({"encoders": old["encoders"], "settings": old["settings"]},
                            {"encoders": dict(encoders), "settings": dict(settings)})
        if diffs:
            raise OutputMismatch(
                f"{out_dir} already holds shards made differently ({source}): {'; '.join(diffs)}. "
                f"Use a new output directory, or rerun with the original --model and settings."
            )


# ---------------------------------------------------------------- the writer


class ShardWriter:
    """Writes samples of one stream into size-rolled tars, atomically, with resumable state.

    Built on ``webdataset.TarWriter``; rolls to a new shard when a sample arrives and the current one
    holds ``max_bytes`` of payload already (so a shard overshoots by at most one sample). Use as a context manager: on a clean exit
    the stream is marked complete; on an exception the shard in progress is still finished when every
    sample in it was written whole (Ctrl-C keeps its work), and discarded otherwise. Safe to call from
    several threads (a background thread may write while the main thread records rejections).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        settings: Mapping[str, Any],
        encoders: Mapping[str, Any],
        listing: str = "",
        rank: int = 0,
        world_size: int = 1,
        max_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        check_compatible(self.out_dir, settings, encoders)
        self.max_bytes = max_bytes
        self.stream = stream_name(rank, world_size)
        self._path = state_path(self.out_dir, self.stream)
        old = read_json(self._path)
        previous = StreamState.from_dict(old).shards if old else []
        self.state = StreamState(self.stream, rank, world_size, listing, dict(settings), dict(encoders))
        self.state.shards = self._recover(previous)
        self._save_state()

        self.done_keys: set[str] = set()
        self.done_inputs: dict[str, str] = {}
        for other in read_states(self.out_dir):
            for record in other.shards:
                self.done_keys.update(record.keys)
                self.done_inputs.update(record.inputs)

        self._lock = threading.RLock()
        self._tar: TarWriter | None = None
        self._file: IO[bytes] | None = None
        self._broken = False
        self._next_index = 1 + max((self._index(r.name) for r in self.state.shards), default=-1)
        self._reset_current()

    # -- public

    def write(self, sample: Mapping[str, bytes | str], bucket: str) -> None:
        """Add one encoded sample (``encode_sample``); a key already written raises ``KeyError``."""
        with self._lock:
            self._write(sample, bucket)

    def finish_input(self, key: str, source: str) -> None:
        """All clips of input ``key`` are written; it counts as done once the current shard is finished."""
        with self._lock:
            self._inputs[key] = source

    def reject(self, source: str, reason: str) -> None:
        with self._lock:
            self.state.rejected.append({"source": source, "reason": reason})

    def close(self, complete: bool = True) -> dict[str, Any]:
        """Finish the shard in progress (unless broken), save state, and merge ``manifest.json``
        (which is also refreshed after every finished shard)."""
        with self._lock:
            if self._broken:
                self._discard_shard()
            else:
                self._finish_shard()
            self.state.complete = complete
            self._save_state()
        return merge_manifest(self.out_dir)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(complete=exc_type is None)

    # -- internals

    def _write(self, sample: Mapping[str, bytes | str], bucket: str) -> None:
        if self._broken:
            raise RuntimeError(f"{self._current_path().name}: an earlier write failed mid-sample")
        key = str(sample["__key__"])
        if key in self.done_keys or key in self._keys:
            raise KeyError(f"sample key {key!r} was already written")
        # Roll before writing, not right after: finish_input calls that follow a sample's write then land
        # in the same shard as the sample.
        if self._bytes >= self.max_bytes:
            self._finish_shard()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._broken = True  # until the tar write returns, the shard may end mid-sample
        members = {k: v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()}
        size = self._tar.write(members)
        self._broken = False
        self._keys.append(key)
        self._buckets[bucket] += 1
        self._bytes += size

    @staticmethod
    def _index(name: str) -> int:
        return int(name.removesuffix(".tar").rsplit("-", 1)[1])

    def _recover(self, records: list[ShardRecord]) -> list[ShardRecord]:
        """Make the directory agree with the recorded shards after a crash."""
        kept = []
        for record in records:
            final = self.out_dir / record.name
            partial = final.with_name(final.name + PARTIAL)
            if not final.exists() and partial.exists():
                os.replace(partial, final)  # the crash fell between saving state and renaming
            if final.exists():
                kept.append(record)
            else:
                log.warning("%s is recorded but missing; its clips will be encoded again", final)
        recorded = {r.name + PARTIAL for r in kept}
        for partial in self.out_dir.glob(f"{self.stream}-[0-9]*.tar{PARTIAL}"):
            if partial.name not in recorded:
                log.info("removing %s, left by an interrupted run; its clips will be encoded again", partial.name)
                partial.unlink()
        return kept

    def _reset_current(self) -> None:
        self._keys: list[str] = []
        self._inputs: dict[str, str] = {}
        self._buckets: Counter[str] = Counter()
        self._bytes = 0

    def _current_path(self) -> Path:
        return self.out_dir / shard_filename(self.stream, self._next_index)

    def _open(self) -> None:
        partial = self._current_path().with_name(self._current_path().name + PARTIAL)
        self._file = open(partial, "wb")
        # PAX headers: member names come from user file names, which may be long or non-ASCII.
        self._tar = TarWriter(self._file, encoder=False, format="PAX_FORMAT")

    def _close_file(self) -> None:
        if self._tar is not None and self._file is not None:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        self._tar = self._file = None

    def _finish_shard(self) -> None:
        if self._tar is None:
            # Inputs can finish without writing a clip (all clips were done by an earlier run).
            return
        self._close_file()
        final = self._current_path()
        partial = final.with_name(final.name + PARTIAL)
        self.state.shards.append(
            ShardRecord(final.name, len(self._keys), partial.stat().st_size, list(self._keys), dict(self._inputs),
                        dict(self._buckets))
        )
        self._save_state()
        os.replace(partial, final)
        log.debug("finished %s (%d samples)", final.name, len(self._keys))
        # Readers and `inspect` can use finished shards while the run goes on.
        merge_manifest(self.out_dir)
        self.done_keys.update(self._keys)
        self.done_inputs.update(self._inputs)
        self._next_index += 1
        self._reset_current()

    def _discard_shard(self) -> None:
        path = self._current_path()
        self._close_file()
        path.with_name(path.name + PARTIAL).unlink(missing_ok=True)
        log.warning("discarded the unfinished %s; its clips will be encoded again on the next run", path.name)
        self._reset_current()
        self._broken = False

    def _save_state(self) -> None:
        write_json_atomic(self._path, self.state.to_dict())


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
        diffs = config_diff({"encoders": first.encoders, "settings": first.settings},
                            {"encoders": s.encoders, "settings": s.settings})
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
