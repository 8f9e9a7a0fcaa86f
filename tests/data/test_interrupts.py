"""Stop signals as Ctrl-C (longcat_data.interrupts): what raises when, and that a library caller's own
handlers come back."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from longcat_data.interrupts import Interrupted, stop_signals


def mine(signum: int, frame: object) -> None:
    raise AssertionError("the caller's handler must not run inside stop_signals")


@pytest.fixture
def own_handlers():
    previous = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("own_handlers")
def test_the_first_signal_raises_later_ones_are_logged_and_handlers_come_back(caplog) -> None:
    with pytest.raises(Interrupted) as err, stop_signals():
        signal.raise_signal(signal.SIGHUP)  # ignored before, so ignored now
        os.kill(os.getpid(), signal.SIGTERM)
    assert (err.value.name, err.value.exit_code) == ("SIGTERM", 143)
    assert isinstance(err.value, KeyboardInterrupt), "code that handles Ctrl-C handles it"
    assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN

    with pytest.raises(Interrupted), stop_signals():
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            signal.raise_signal(signal.SIGTERM)  # during the cleanup: logged, not raised
    assert "SIGTERM: already stopping" in caplog.text


@pytest.mark.usefixtures("own_handlers")
def test_a_deferred_block_finishes_before_the_signal_raises() -> None:
    finished = []
    with pytest.raises(Interrupted) as err, stop_signals() as stop:
        with stop.deferred():
            signal.raise_signal(signal.SIGINT)
            finished.append(True)
    assert finished == [True] and err.value.exit_code == 130

    with stop_signals() as stop, stop.deferred(raise_after=False):
        signal.raise_signal(signal.SIGTERM)  # another exception is on its way: nothing more raised
    assert stop.received == signal.SIGTERM


def test_outside_the_main_thread_nothing_changes() -> None:
    seen = []

    def work() -> None:
        with stop_signals() as stop:
            seen.append((signal.getsignal(signal.SIGTERM), stop.received))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [(before, None)]


@pytest.mark.usefixtures("own_handlers")
def test_a_signal_while_an_input_is_fetched_waits_for_it_and_a_second_one_stops_the_wait() -> None:
    fetched, used = [], []

    def inputs():
        signal.raise_signal(signal.SIGTERM)  # arrives mid-fetch: the fetch goes on
        fetched.append(1)
        yield 1

    with pytest.raises(Interrupted), stop_signals() as stop:
        used.extend(stop.between(inputs()))
    assert (fetched, used) == ([1], []), "fetched whole, then dropped: the signal raised before its use"

    def hung():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # asked again: stop waiting
        fetched.append(2)
        yield 2

    with pytest.raises(Interrupted), stop_signals() as stop:
        used.extend(stop.between(hung()))
    assert (fetched, used) == ([1], [])
