"""Stopping a run at a step boundary: a stop signal finishes the step in flight, saves a checkpoint and
ends the run with :class:`TrainingStopped`.

Stop signals (``longcat_data.defaults.STOP_SIGNALS``): SIGTERM (schedulers, ``kill``, torchrun passing
its own on), SIGHUP (the terminal went away), SIGUSR1 (SLURM's warning before the time limit,
``--signal=USR1@120``) and SIGINT (Ctrl-C; a second Ctrl-C stops at once, losing the steps since the
last checkpoint). The trainer reduces
:attr:`StopSignals.signum` over ranks at every step boundary (``parallel.agree``), so all ranks stop at
the same step even when only one was signalled. Imports no torch: the command line catches
:class:`TrainingStopped` without loading it.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType

from longcat_data.defaults import STOP_SIGNALS


class TrainingStopped(Exception):
    """The run stopped early on a signal, after saving ``checkpoint`` at ``step``."""

    def __init__(self, step: int, checkpoint: Path, signum: int, output_dir: str) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(
            f"stopped at step {step} ({signal.Signals(signum).name}): checkpoint saved to {checkpoint}; "
            f"resume with --resume latest --output-dir {shlex.quote(str(output_dir))}"
        )

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


class StopSignals:
    """While entered, the stop signals record a stop request instead of ending the process; the
    handlers that were there before come back on exit. Only the main thread can own signal handlers:
    elsewhere this does nothing and signals keep their usual effect.

    A Ctrl-C that comes ``quit_after`` seconds or more after the first stop signal raises
    KeyboardInterrupt at once. Sooner it is the same request again: torchrun passes its own Ctrl-C on
    to ranks that got the terminal's already."""

    def __init__(self, quit_after: float = 1.0) -> None:
        self.signum = 0  # the first stop signal received, 0 for none
        self.quit_after = quit_after
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum, self._first = signum, time.monotonic()
            # A raw write: the handler may run while the logging or tqdm machinery is mid-write.
            os.write(
                2,
                f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and "
                f"stopping (Ctrl-C again stops at once)\n".encode(),
            )
        elif signum == signal.SIGINT and time.monotonic() - self._first >= self.quit_after:
            raise KeyboardInterrupt
