"""Shard writing: samples into size-rolled tars, renamed into place only once finished and recorded.

On disk, in the output directory::

    train-000000.tar ...          finished shards (one writer: ``--world-size 1``)
    train-r{rank}-000000.tar ...  finished shards of rank ``rank`` when the work is split over ranks
    *.tar.partial                 the shard being written; renamed to its final name once complete
    *.tar.unlisted                a shard file set aside because it is not what its record says

A remote output folder (``s3://``, ``gs://``, ... through ``longcat_data.storage``) holds the same names
but no partials: the shard in progress is written in a local staging folder (one shard at a time) and
uploaded to its final name once its state is saved; the store shows it only once the upload is whole.

A writer owns one stream, under that stream's lock (``longcat_data.locks``), so two runs can never write
one stream at once and ranks never touch each other's files. Its state (``longcat_data.manifest``) lists
every finished shard with the clip keys and input keys inside it; it is rewritten (atomically) *before*
a finished tar is renamed to its final name, so a visible ``.tar`` is always recorded and a crash can
lose at most the ``.partial`` shard in progress. On start the writer tidies up after a killed run
(``recover_stream``): it renames a recorded-but-unrenamed partial, deletes unrecorded partials and stray
temporaries, reads back finished shards its state does not list (``adopt_shard``), and does the same
tidying for streams whose writer no longer runs. A write that fails (disk full) drops the shard in
progress and keeps the state, so a rerun continues.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from webdataset import TarWriter
from webdataset.tariterators import group_by_keys

from longcat_data import storage
from longcat_data.files import OutputError, describe_os_error
from longcat_data.locks import Holder, StreamLock, try_lock, unlock
from longcat_data.manifest import (
    STATE_DIR,
    ShardRecord,
    StreamState,
    captions_cache_name,
    check_compatible,
    merge_manifest,
    read_state,
    read_states,
    state_name,
)
from longcat_data.object_locks import ObjectLock
from longcat_data.shards import META, ShardSample, bucket_name
from longcat_data.storage import Folder, describe_error
from longcat_data.tars import tar_members

log = logging.getLogger(__name__)

PARTIAL = ".partial"
UNLISTED = ".unlisted"
DEFAULT_SHARD_BYTES = 1_000_000_000


class DirectTarWriter(TarWriter):
    """``TarWriter`` writing straight into its file (tar mode ``w:``) rather than through tarfile's
    stream buffer, so a shard dropped after a failed write leaves no buffer that would later be flushed
    into the closed file."""

    @staticmethod
    def tarmode(fileobj: Any, compress: Any = None) -> str:
        return "w:"


def stream_name(rank: int, world_size: int) -> str:
    """Shard-name prefix of one writer: ``train`` alone, ``train-r{rank}`` when split over ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return "train" if world_size == 1 else f"train-r{rank}"


def shard_filename(stream: str, index: int) -> str:
    return f"{stream}-{index:06d}.tar"


def shard_index(name: str) -> int:
    return int(name.removesuffix(".tar").rsplit("-", 1)[1])


def stream_shards(out_dir: Path, stream: str, suffix: str = "") -> list[Path]:
    """``stream``'s shard files in ``out_dir`` ending in ``.tar`` + ``suffix``, by index."""
    pattern = f"{stream}-[0-9][0-9][0-9][0-9][0-9][0-9].tar{suffix}"
    return sorted(out_dir.glob(pattern))


def open_output_dir(out_dir: Path) -> None:
    """Create the output folder; OutputError (one line) when it is a file or cannot be made or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / STATE_DIR).mkdir(exist_ok=True)
    except FileExistsError as err:
        raise OutputError(f"{err.filename} is a file, not a folder: choose another output folder") from err
    except OSError as err:
        raise OutputError(describe_os_error(err)) from err
    if not os.access(out_dir / STATE_DIR, os.W_OK | os.X_OK):
        raise OutputError(f"{out_dir}: cannot write into it; check its permissions or choose another one")


def set_aside(store: Folder, name: str, why: str) -> None:
    store.rename(name, name + UNLISTED)
    log.warning("%s %s; set aside as %s%s (delete it once checked)", store.url(name), why, name, UNLISTED)


def recover_stream(
    store: Folder, stream: str, records: list[ShardRecord], staging: Path | None = None
) -> list[ShardRecord]:
    """Make the folder agree with one stream's records after a crash; the records still true.

    ``staging``: where the stream's partial shards are (the folder itself when it is local). Only call
    it while holding the stream's lock: it renames and deletes that stream's files.
    """
    staging = staging if staging is not None else store.local
    kept = []
    for record in records:
        partial = staging / (record.name + PARTIAL) if staging is not None else None
        size = store.size(record.name)
        if size is None and partial is not None and partial.is_file():
            if partial.stat().st_size == record.bytes:
                store.publish(partial, record.name)  # the crash fell between saving state and renaming
                size = record.bytes
        if size is None:
            log.warning("%s is recorded but missing; its clips will be encoded again", store.url(record.name))
        elif size != record.bytes:
            set_aside(store, record.name, f"is {size} bytes but recorded as {record.bytes}")
        else:
            kept.append(record)
    partials = stream_shards(staging, stream, PARTIAL) if staging is not None else []
    for partial in partials:
        log.info("removing %s, left by an interrupted run; its clips will be encoded again", partial.name)
        partial.unlink(missing_ok=True)
    for name in (state_name(stream), captions_cache_name(stream)):
        for stray in store.temporaries(name):
            store.remove(stray)
    if store.local is None:
        # Shards go up under their own names on object stores, through temporaries elsewhere.
        shard = re.compile(rf"\.?{re.escape(stream)}-\d{{6}}\.tar(\.\d+\.tmp)?")
        for stray in store.names(f".{stream}-*.tar.*.tmp"):
            if shard.fullmatch(stray):
                store.remove(stray)
        aborted = store.abort_uploads(lambda name: bool(shard.fullmatch(name)))
        if aborted:
            log.info("aborted %d unfinished upload(s) of %s, left by an interrupted run", aborted, stream)
    return kept


def adopt_shard(
    store: Folder, name: str, encoders: Mapping[str, Any], taken: set[str], single_clip: bool
) -> ShardRecord | str:
    """The record of a finished shard no state lists (its state was lost or moved away), read back
    from the tar; or why it cannot be adopted. ``taken``: keys recorded elsewhere. With one clip per
    video (``single_clip``) a clip is its whole input, so its input counts as done too; otherwise the
    inputs are probed again on the next run (their written clips are still skipped)."""
    damage: list[Any] = []
    url = store.url(name)
    with store.open(name) as f:
        members = ({"fname": n, "data": d, "__url__": url} for n, d in tar_members(f, damage.append))
        samples = list(group_by_keys(members))
    if damage:
        return f"is damaged ({damage[0].describe()})"
    keys: list[str] = []
    inputs: dict[str, str] = {}
    buckets: Counter[str] = Counter()
    for sample in samples:
        key = sample["__key__"]
        try:
            ShardSample.check_members(sample)
            meta = json.loads(sample[META])
            bucket = bucket_name(*meta["bucket"])
        except (ValueError, KeyError, TypeError) as err:
            return f"holds an unreadable sample {key} ({err})"
        if meta.get("encoders") not in (None, dict(encoders)):  # as readers judge it
            return f"holds sample {key} made with other encoders ({meta.get('encoders')})"
        if key in taken or key in keys:
            return f"holds sample {key}, which is recorded already"
        keys.append(key)
        buckets[bucket] += 1
        if single_clip and isinstance(meta.get("source"), str):
            inputs[key] = meta["source"]
    return ShardRecord(name, len(keys), store.size(name) or 0, keys, inputs, dict(buckets))


class ShardWriter:
    """Writes samples of one stream into size-rolled tars, atomically, with resumable state.

    Built on ``webdataset.TarWriter``; rolls to a new shard when a sample arrives and the current one
    holds ``max_bytes`` of payload already (so a shard overshoots by at most one sample). Use as a
    context manager: on a clean exit the stream is marked complete; on an exception the shard in
    progress is still finished when every sample in it was written whole (Ctrl-C keeps its work), and
    discarded otherwise or when the disk failed. Safe to call from several threads (a background thread
    may write while the main thread records rejections). Holds the stream's lock until ``close``;
    OutputLocked when another live process has it. ``out_dir`` may be a remote URL; its shard in
    progress is then written in ``staging_dir`` (required) and uploaded once finished.
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
        staging_dir: str | Path | None = None,
    ) -> None:
        self.store = storage.folder(out_dir)
        if self.store.local is None and staging_dir is None:
            raise ValueError(f"{self.store.url()} is remote: a local staging folder is needed for its shards")
        self.staging = self.store.local or Path(staging_dir or "")
        if self.store.local is not None:
            open_output_dir(self.store.local)  # an object store has no folders: the lock is the first write
        self.staging.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.stream = stream_name(rank, world_size)
        holder = Holder.me(self.stream, world_size, listing)
        self._stream_lock: StreamLock | ObjectLock = (
            StreamLock(self.store.local / STATE_DIR, holder)
            if self.store.local is not None
            else ObjectLock(self.store, holder)
        )
        self._stream_lock.acquire()
        self._state_name = state_name(self.stream)
        try:
            check_compatible(self.store, settings, encoders)
            self.state = StreamState(self.stream, rank, world_size, listing, dict(settings), dict(encoders))
            self._tidy(settings, encoders)
        except OSError as err:
            self._stream_lock.release()
            raise OutputError(describe_error(err, err.filename or self.store.url())) from err
        except BaseException:
            self._stream_lock.release()
            raise

        self._lock = threading.RLock()
        self._tar: DirectTarWriter | None = None
        self._file: IO[bytes] | None = None
        self._broken = False  # the shard in progress may end mid-sample
        self._failed: OutputError | None = None  # a write to disk failed: nothing more is written
        self._next_index = 1 + max((shard_index(r.name) for r in self.state.shards), default=-1)
        self._reset_current()

    # -- public

    def write(self, sample: Mapping[str, bytes | str], bucket: str) -> None:
        """Add one sample's members (``ShardSample.to_members``); a key already written raises ``KeyError``,
        a failing disk OutputError (after which the writer only closes)."""
        with self._lock:
            if self._failed is not None:
                raise self._failed
            try:
                self._write(sample, bucket)
            except OSError as err:
                self._failed = OutputError(
                    f"{describe_error(err, err.filename or self._partial_path())}, then re-run the same "
                    "command to continue (the shards finished so far are kept; the one in progress is "
                    "dropped and encoded again)"
                )
                raise self._failed from err

    def finish_input(self, key: str, source: str) -> None:
        """All clips of input ``key`` are written; it counts as done once the current shard is finished."""
        with self._lock:
            self._inputs[key] = source

    def reject(self, source: str, reason: str) -> None:
        with self._lock:
            self.state.rejected.append({"source": source, "reason": reason})

    def close(self, complete: bool = True) -> dict[str, Any] | None:
        """Finish the shard in progress (unless broken or the disk failed: then drop it), save state,
        release the lock and merge ``manifest.json`` (also refreshed after every finished shard).

        Returns the manifest, or None when saving failed after an earlier failed write (the state on
        disk is then the one before it, still consistent). OutputError when saving fails here first.
        """
        with self._lock:
            try:
                if self._broken or self._failed is not None:
                    self._discard_shard()
                else:
                    self._finish_shard()
                self.state.complete = complete and self._failed is None
                self._save_state()
                return merge_manifest(self.store)
            except OSError as err:
                self._discard_shard()
                if self._failed is not None:
                    log.error("could not save the prep state after the failed write: %s", describe_error(err))
                    return None
                where = err.filename or self.store.url(self._state_name)
                raise OutputError(
                    f"{describe_error(err, where)}, then re-run the same command "
                    "to continue (the shards finished so far are kept)"
                ) from err
            finally:
                self._stream_lock.release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(complete=exc_type is None)

    # -- internals

    def _tidy(self, settings: Mapping[str, Any], encoders: Mapping[str, Any]) -> None:
        """After a killed run: this stream's files made to agree with its state, other streams' too
        where their writer no longer runs; finished shards no state lists are read back."""
        previous = read_state(self.store, self._state_name)
        self.state.shards = recover_stream(
            self.store, self.stream, previous.shards if previous else [], self.staging
        )
        for other in read_states(self.store):
            if other.stream != self.stream:
                self._tidy_other(other)
        taken = {
            key
            for s in read_states(self.store)
            if s.stream != self.stream
            for r in s.shards
            for key in r.keys
        }
        taken.update(key for r in self.state.shards for key in r.keys)
        recorded = {r.name for r in self.state.shards}
        for name in self.store.names(f"{self.stream}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            if name in recorded:
                continue
            adopted = adopt_shard(self.store, name, encoders, taken, settings.get("clips_per_video", 1) == 1)
            if isinstance(adopted, str):
                set_aside(self.store, name, f"is not in any prep state and {adopted}")
                continue
            log.warning("%s is not in the prep state; read back its %d samples", name, adopted.samples)
            self.state.shards.append(adopted)
            taken.update(adopted.keys)
        self.state.shards.sort(key=lambda r: r.name)
        self._save_state()

        self.done_keys: set[str] = set()
        self.done_inputs: dict[str, str] = {}
        for state in [*(s for s in read_states(self.store) if s.stream != self.stream), self.state]:
            for record in state.shards:
                self.done_keys.update(record.keys)
                self.done_inputs.update(record.inputs)

    def _tidy_other(self, other: StreamState) -> None:
        if self.store.local is None:
            lock = ObjectLock(self.store, Holder.me(other.stream, other.world_size, other.listing))
            if not lock.take_if_free():
                return  # its writer runs: its files are its own
            release = lock.release
        else:
            fd = try_lock(self.store.local / STATE_DIR, other.stream)
            if fd is None:
                return
            release = lambda: unlock(fd)  # noqa: E731
        try:
            # Another stream's partials are in its own run's staging folder, not in this one.
            kept = recover_stream(self.store, other.stream, other.shards, self.store.local)
            if kept != other.shards:
                other.shards = kept
                self.store.write_atomic(
                    state_name(other.stream), json.dumps(other.to_dict(), indent=1, ensure_ascii=False)
                )
        finally:
            release()

    def _write(self, sample: Mapping[str, bytes | str], bucket: str) -> None:
        if self._broken:
            raise RuntimeError(f"{self._current_name()}: an earlier write failed mid-sample")
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

    def _reset_current(self) -> None:
        self._keys: list[str] = []
        self._inputs: dict[str, str] = {}
        self._buckets: Counter[str] = Counter()
        self._bytes = 0

    def _current_name(self) -> str:
        return shard_filename(self.stream, self._next_index)

    def _partial_path(self) -> Path:
        return self.staging / (self._current_name() + PARTIAL)

    def _open(self) -> None:
        self._file = open(self._partial_path(), "wb")
        # PAX headers: member names come from user file names, which may be long or non-ASCII.
        self._tar = DirectTarWriter(self._file, encoder=False, format="PAX_FORMAT")

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
        final, partial = self._current_name(), self._partial_path()
        record = ShardRecord(
            final,
            len(self._keys),
            partial.stat().st_size,
            list(self._keys),
            dict(self._inputs),
            dict(self._buckets),
        )
        self.state.shards.append(record)
        try:
            self._save_state()
        except BaseException:
            self.state.shards.pop()  # not on disk, so not recorded: the partial is dropped
            raise
        self.store.publish(partial, final)
        log.debug("finished %s (%d samples)", final, len(self._keys))
        # Readers and `inspect` can use finished shards while the run goes on.
        merge_manifest(self.store, count_samples=False)
        self.done_keys.update(self._keys)
        self.done_inputs.update(self._inputs)
        self._next_index += 1
        self._reset_current()

    def _discard_shard(self) -> None:
        """Drop the shard in progress without writing another byte (the disk may be full)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            log.warning(
                "discarded the unfinished %s; its clips will be encoded again on the next run",
                self._current_name(),
            )
        self._tar = self._file = None
        self._partial_path().unlink(missing_ok=True)
        self._reset_current()
        self._broken = False

    def _save_state(self) -> None:
        self.store.write_atomic(
            self._state_name, json.dumps(self.state.to_dict(), indent=1, ensure_ascii=False)
        )
