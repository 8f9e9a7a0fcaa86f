"""Stop signals as Ctrl-C: SIGTERM (SLURM, Kubernetes, ``docker stop``) and SIGHUP end a long job the way
Ctrl-C does, by an exception in the main thread that the pipeline's cleanup already handles.

``stop_signals()`` installs the handlers for its block and puts the previous ones back after it (so a
library caller keeps its own); a signal that was ignored (SIGHUP under ``nohup``) stays ignored. The
first signal raises ``Interrupted``: at once, or, inside ``deferred()`` (closing a shard), when the block
ends, or, while ``between()`` fetches the next input, once it has arrived (a second signal there stops
the wait). Later signals are only logged, so a second Ctrl-C cannot cut the cleanup short.
``Interrupted`` is a ``KeyboardInterrupt``, so code that handles Ctrl-C handles all three, and its
``exit_code`` is the shell's 128 + signal number.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``exit_code`` is 128 + its number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = 0
        self._waiting = False
        self._raised = False

    def handle(self, signum: int, _: FrameType | None) -> None:
        if self.received is not None:
            if self._waiting and not self._deferring and not self._raised:
                self._raise()  # asked twice: stop waiting for the input in flight (a hung decoder?)
            log.warning(
                "%s: already stopping (closing the shard in progress); kill -9 to stop at once, "
                "losing that shard",
                signal.Signals(signum).name,
            )
            return
        self.received = signum
        log.warning("%s: stopping after the clip in flight", signal.Signals(signum).name)
        if not self._deferring and not self._waiting:
            self._raise()

    def _raise(self) -> None:
        assert self.received is not None
        self._raised = True
        raise Interrupted(self.received)

    def between(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, a first stop signal raising only between two of them: one arriving while the next
        item is being fetched (a decode worker's transfer, an inline decode) waits for it."""
        iterator = iter(items)
        while True:
            self._waiting = True
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self._waiting = False
            if self.received is not None and not self._raised:
                self._raise()
            yield item

    @contextmanager
    def deferred(self, *, raise_after: bool = True) -> Iterator[None]:
        """A block a stop signal must not cut: the signal raises once the block is done (unless not
        ``raise_after``: another exception is on its way out already)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if raise_after and self.received is not None and not self._raised and not self._deferring:
            self._raise()


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Stop signals raise ``Interrupted`` inside the block (main thread only; elsewhere nothing changes)."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGHUP under nohup stays ignored
                previous[signum] = signal.signal(signum, stop.handle)
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals() -> None:
    """For worker processes: the main process gets the same signals (one process group) and decides."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
