"""One writer per output stream: an advisory lock file ``OUT_DIR/.prep/<stream>.lock``.

The lock is an ``flock`` on the file, so the kernel releases it when its process dies, however it dies.
The file itself holds who has it (host, pid, start time, the run's world size and input listing) for
the messages, and its modification time is a heartbeat the holder renews every ``HEARTBEAT_SECONDS``:

- a free lock whose file still names a holder was left by a killed run: taken over with a warning;
- a held lock: refused, naming the holder and how to clear it;
- on a filesystem where ``flock`` does not reach other hosts (or does not work at all), the content
  decides: a holder on another host whose heartbeat is fresher than ``STALE_SECONDS`` counts as alive,
  one on this host counts as alive while its pid runs.

Writers of different runs (another ``--world-size``, or another input listing) must not share a folder
even on different streams, or they write the same clips twice: ``StreamLock`` refuses that too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from longcat_data.files import OutputError, describe_os_error

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
WAIT_SECONDS = 3.0  # a lock taken briefly by another run's clean-up is waited for, not refused
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputLocked(OutputError):
    """Another live process writes this output stream (or another run writes this folder)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    stream: str
    world_size: int
    listing: str

    @classmethod
    def me(cls, stream: str, world_size: int, listing: str) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time(), stream, world_size, listing)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None  # empty (released cleanly) or cut short while being written

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} (started {started})"

    def is_alive(self, heartbeat: float) -> bool:
        """From the content alone: for when flock cannot tell (another host, no flock support)."""
        if self.host != socket.gethostname():
            return time.time() - heartbeat < STALE_SECONDS
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def lock_path(state_dir: Path, stream: str) -> Path:
    return state_dir / f"{stream}{LOCK_SUFFIX}"


def read_holder(path: Path) -> tuple[Holder | None, float]:
    """The holder a lock file names (None when free or unreadable) and its heartbeat time."""
    try:
        return Holder.parse(path.read_text(encoding="utf-8")), path.stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return None, 0.0


class StreamLock:
    """The lock of one stream; ``acquire`` raises OutputLocked, ``release`` is idempotent."""

    def __init__(self, state_dir: Path, holder: Holder) -> None:
        self.path = lock_path(state_dir, holder.stream)
        self.holder = holder
        # A file object, not a bare fd: a writer dropped without closing (its process lives on) lets
        # the lock go when it is collected, as a killed process would.
        self._file: IO[bytes] | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
        except OSError as err:
            raise OutputError(describe_os_error(err, self.path)) from err
        fd = file.fileno()
        try:
            flocked = self._flock(fd)
            previous, heartbeat = read_holder(self.path)
            if flocked is False:
                raise OutputLocked(self._refusal(previous, heartbeat))
            if previous is not None and previous.pid != os.getpid():
                # Free by flock, but flock may not reach across hosts (or not work at all) here: a
                # fresh heartbeat, or a running pid on this host, says that run still writes.
                remote = previous.host != socket.gethostname()
                if (remote or flocked is None) and previous.is_alive(heartbeat):
                    raise OutputLocked(self._refusal(previous, heartbeat))
                log.warning(
                    "%s: taking over the lock of %s, which no longer runs (killed?)",
                    self.path,
                    previous.describe(),
                )
            self._write(fd, json.dumps(asdict(self.holder)))
            self._file = file
        except OSError as err:
            file.close()
            raise OutputError(describe_os_error(err, self.path)) from err
        except BaseException:
            file.close()
            raise
        try:
            self._refuse_other_runs()
        except BaseException:
            self.release()
            raise
        self._stop = threading.Event()
        self._beat = threading.Thread(
            target=beat_until_stopped,
            args=(weakref.ref(self), self._stop),
            name=f"lock-{self.holder.stream}",
            daemon=True,
        )
        self._beat.start()

    def release(self) -> None:
        if self._file is None:
            return
        self._stop.set()
        file, self._file = self._file, None
        try:
            os.ftruncate(file.fileno(), 0)  # a free lock names nobody: the next run takes it silently
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        except OSError as err:
            log.debug("releasing %s: %s", self.path, err)
        finally:
            file.close()

    def __enter__(self) -> StreamLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    # -- internals

    def _flock(self, fd: int) -> bool | None:
        """True once flocked, False when the lock is still held after ``WAIT_SECONDS``, None (after a
        warning) on a filesystem without flock, where the content alone decides."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
            except OSError as err:
                if err.errno not in NO_FLOCK:
                    raise OutputError(describe_os_error(err, self.path)) from err
                log.warning(
                    "%s: this filesystem has no file locks; relying on the lock file's content", self.path
                )
                return None

    def _refusal(self, holder: Holder | None, heartbeat: float) -> str:
        folder = self.path.parent.parent
        if holder is None:
            return f"{folder} is being written by another process (stream {self.holder.stream}); wait for it"
        if holder.host == socket.gethostname() and not holder.is_alive(heartbeat):
            return (
                f"{folder}: the lock {self.path} of {holder.describe()} is still held though that pid has "
                f"exited: a process it started still runs (find it with `fuser -v {self.path}`); stop it"
            )
        clear = f"if it no longer runs, delete {self.path}"
        if holder.host != socket.gethostname():
            clear += (
                f" (or wait: a lock without a heartbeat for {STALE_SECONDS / 60:g} minutes is taken over)"
            )
        return (
            f"{folder} is being written by {holder.describe()} (stream {holder.stream}); "
            f"wait for it to finish or stop it; {clear}"
        )

    def _refuse_other_runs(self) -> None:
        """OutputLocked when a live writer of another run (world size, listing) shares the folder."""
        for path in sorted(self.path.parent.glob(f"*{LOCK_SUFFIX}")):
            if path == self.path:
                continue
            other, heartbeat = read_holder(path)
            if other is None or not other.is_alive(heartbeat):
                continue
            why = other_run_difference(other, self.holder)
            if why is None:
                continue
            raise OutputLocked(
                f"{self.path.parent.parent} is being written by another run, {other.describe()} (stream "
                f"{other.stream}) {why}: both would write the same clips; wait for it to finish, then re-run"
            )

    def _write(self, fd: int, text: str) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8"), 0)
        os.fsync(fd)

    def beat(self) -> None:
        file = self._file
        if file is not None:
            try:
                os.utime(file.fileno())
            except (OSError, ValueError) as err:
                log.debug("heartbeat of %s: %s", self.path, err)


def beat_until_stopped(lock: weakref.ref, stop: threading.Event) -> None:
    """A lock's heartbeat thread: ``lock().beat()`` every HEARTBEAT_SECONDS until ``stop`` is set or the
    lock is gone (a StreamLock or an object_locks.ObjectLock)."""
    # Holds the lock weakly, so that dropping the writer still closes (and so frees) it.
    while not stop.wait(HEARTBEAT_SECONDS):
        held = lock()
        if held is None:
            return
        held.beat()
        del held


def try_lock(state_dir: Path, stream: str) -> int | None:
    """The fd of ``stream``'s lock when nobody holds it (the caller then owns it: ``unlock``), else None.

    For tidying up after another stream's killed run: only while its lock is ours is that safe.
    """
    path = lock_path(state_dir, stream)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    holder, heartbeat = read_holder(path)
    if holder is not None and holder.is_alive(heartbeat) and holder.host != socket.gethostname():
        unlock(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def other_run_difference(other: Holder, holder: Holder) -> str | None:
    """How the writer ``other`` belongs to another run than ``holder`` (another world size or listing of
    the videos), or None when both are streams of one run."""
    if other.world_size != holder.world_size:
        return f"with --world-size {other.world_size}, this one with {holder.world_size}"
    if other.listing != holder.listing:
        return "over another list of videos (videos were added or removed since it started)"
    return None
