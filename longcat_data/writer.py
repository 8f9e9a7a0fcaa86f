"""Shard writing: samples into size-rolled tars, renamed into place only once finished and recorded.

On disk, in the output directory::

    train-000000.tar ...          finished shards (one writer: ``--world-size 1``)
    train-r{rank}-000000.tar ...  finished shards of rank ``rank`` when the work is split over ranks
    *.tar.partial                 the shard being written; renamed to its final name once complete

A writer owns one stream, so ranks never touch each other's files. Its state (``longcat_data.manifest``)
lists every finished shard with the clip keys and input keys inside it; it is rewritten (atomically)
*before* a finished tar is renamed to its final name, so a visible ``.tar`` is always recorded and a
crash can lose at most the ``.partial`` shard in progress. On restart the writer renames a
recorded-but-unrenamed partial, deletes unrecorded ones, and skips inputs found in any stream's
finished shards.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from webdataset import TarWriter

from longcat_data.files import read_json, write_json_atomic
from longcat_data.manifest import (
    ShardRecord,
    StreamState,
    check_compatible,
    merge_manifest,
    read_states,
    state_path,
)

log = logging.getLogger(__name__)

PARTIAL = ".partial"
DEFAULT_SHARD_BYTES = 1_000_000_000


def stream_name(rank: int, world_size: int) -> str:
    """Shard-name prefix of one writer: ``train`` alone, ``train-r{rank}`` when split over ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return "train" if world_size == 1 else f"train-r{rank}"


def shard_filename(stream: str, index: int) -> str:
    return f"{stream}-{index:06d}.tar"


class ShardWriter:
    """Writes samples of one stream into size-rolled tars, atomically, with resumable state.

    Built on ``webdataset.TarWriter``; rolls to a new shard when a sample arrives and the current one
    holds ``max_bytes`` of payload already (so a shard overshoots by at most one sample). Use as a
    context manager: on a clean exit the stream is marked complete; on an exception the shard in
    progress is still finished when every sample in it was written whole (Ctrl-C keeps its work), and
    discarded otherwise. Safe to call from several threads (a background thread may write while the
    main thread records rejections).
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
        """Add one sample's members (``ShardSample.to_members``); a key already written raises ``KeyError``."""
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
        members = {
            k: v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()
        }
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
                log.info(
                    "removing %s, left by an interrupted run; its clips will be encoded again", partial.name
                )
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
            ShardRecord(
                final.name,
                len(self._keys),
                partial.stat().st_size,
                list(self._keys),
                dict(self._inputs),
                dict(self._buckets),
            )
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
