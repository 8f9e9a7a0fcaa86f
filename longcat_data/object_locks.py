"""One live writer per output stream of a remote output folder: a lock object ``.prep/<stream>.lock``.

The remote counterpart of ``longcat_data.locks`` (same holder record, same messages). Object stores have
no ``flock``, so the lock is the object itself:

- taken by a conditional create (S3 ``If-None-Match: *``; fsspec ``mode="create"``): of two writers
  starting together exactly one gets it. On a store without conditional writes it is checked, then
  written: two starts within one request's time could both get it (a warning says so once);
- held: the holder rewrites it every ``HEARTBEAT_SECONDS``, so its modification time (the store's clock)
  says it is alive; a lock without a heartbeat for ``STALE_SECONDS``, or naming a pid of this host that
  no longer runs (a kill -9, then the rerun), is taken over with a warning;
- released by deleting it, only while it still names its holder.

A taken-over lock's old holder (it was alive after all, e.g. stalled past ``STALE_SECONDS``) finds another
holder named at its next heartbeat and logs an error; it cannot be stopped from the outside, so keep
stalls shorter than ``STALE_SECONDS``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from dataclasses import asdict

from longcat_data.files import OutputError
from longcat_data.locks import (
    LOCK_SUFFIX,
    STALE_SECONDS,
    WAIT_SECONDS,
    Holder,
    OutputLocked,
    beat_until_stopped,
    other_run_difference,
)
from longcat_data.storage import RemoteFolder, describe_remote_error

log = logging.getLogger(__name__)

STATE_DIR = ".prep"  # = manifest.STATE_DIR (manifest imports this module)


class ObjectLock:
    """The lock of one stream of a remote folder; ``acquire`` raises OutputLocked, ``release`` is
    idempotent."""

    def __init__(self, store: RemoteFolder, holder: Holder) -> None:
        self.store = store
        self.holder = holder
        self.name = f"{STATE_DIR}/{holder.stream}{LOCK_SUFFIX}"
        self._payload = json.dumps(asdict(holder)).encode("utf-8")
        self._held = False
        self._stop = threading.Event()

    def acquire(self, wait: float = WAIT_SECONDS, *, refuse_other_runs: bool = True) -> None:
        deadline = time.monotonic() + wait
        try:
            while not self._take():
                if time.monotonic() > deadline:
                    raise OutputLocked(self._refusal())
                time.sleep(0.2)
        except OSError as err:
            raise OutputError(describe_remote_error(err, self.store.url(self.name))) from err
        self._held = True
        if refuse_other_runs:
            try:
                self._refuse_other_runs()
            except BaseException:
                self.release()
                raise
        self._stop = threading.Event()
        beat = threading.Thread(
            target=beat_until_stopped,
            args=(weakref.ref(self), self._stop),
            name=f"lock-{self.name}",
            daemon=True,
        )
        beat.start()

    def take_if_free(self) -> bool:
        """Take the lock when nobody alive holds it (for tidying a killed run's stream); no wait."""
        try:
            self.acquire(0.0, refuse_other_runs=False)
        except OutputLocked:
            return False
        return True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        try:
            if self._holder() == self.holder:
                self.store.remove(self.name)
        except OSError as err:
            log.warning("releasing %s: %s (delete it if no run holds it)", self.store.url(self.name), err)

    def beat(self) -> None:
        if not self._held:
            return
        try:
            current = self._holder()
            if current != self.holder:
                who = current.describe() if current is not None else "nobody"
                log.error("%s now names %s: the lock was taken over", self.store.url(self.name), who)
                return
            self.store.write_atomic(self.name, self._payload)
        except OSError as err:
            log.debug("heartbeat of %s: %s", self.store.url(self.name), err)

    def __enter__(self) -> ObjectLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    # -- internals

    def _holder(self, name: str | None = None) -> Holder | None:
        try:
            return Holder.parse(self.store.read_bytes(name or self.name).decode("utf-8", "replace"))
        except FileNotFoundError:
            return None

    def _heartbeat_of(self, name: str) -> float:
        try:
            return self.store.modified(name)
        except FileNotFoundError:
            return 0.0

    def _take(self) -> bool:
        """True once the lock object is ours; a dead holder's is deleted first."""
        if self.store.create(self.name, self._payload):
            return True
        previous, heartbeat = self._holder(), self._heartbeat_of(self.name)
        if previous is None and heartbeat == 0.0:
            return False  # released between the two calls: the next try creates it
        if previous is not None and previous.is_alive(heartbeat):
            return False
        if previous is None and time.time() - heartbeat < STALE_SECONDS:
            return False  # unreadable (being rewritten?) and fresh: wait for it
        log.warning(
            "%s: taking over the lock of %s, which no longer runs (killed?)",
            self.store.url(self.name),
            previous.describe() if previous is not None else "an unknown holder",
        )
        self.store.remove(self.name)
        return self.store.create(self.name, self._payload)

    def _refusal(self) -> str:
        folder, holder = self.store.url(), self._holder()
        if holder is None:
            return f"{folder} is being written by another process (stream {self.holder.stream}); wait for it"
        return (
            f"{folder} is being written by {holder.describe()} (stream {holder.stream}); wait for it to "
            f"finish or stop it; if it no longer runs, delete {self.store.url(self.name)} (or wait: a lock "
            f"without a heartbeat for {STALE_SECONDS / 60:g} minutes is taken over)"
        )

    def _refuse_other_runs(self) -> None:
        """OutputLocked when a live writer of another run (world size, listing) shares the folder."""
        for name in self.store.names(f"{STATE_DIR}/*{LOCK_SUFFIX}"):
            if name == self.name:
                continue
            other = self._holder(name)
            if other is None or other.stream == "merge" or not other.is_alive(self._heartbeat_of(name)):
                continue
            why = other_run_difference(other, self.holder)
            if why is None:
                continue
            raise OutputLocked(
                f"{self.store.url()} is being written by another run, {other.describe()} (stream "
                f"{other.stream}) {why}: both would write the same clips; wait for it to finish, then re-run"
            )
