"""Stop signals: SIGINT, SIGTERM and SIGHUP stop a `dcgan` command the same way, through every
`finally` and atexit hook between the signal and main(), so what it started (Prometheus, a local
Ray, torchrun's ranks) stops with it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

# a service manager, `timeout` and `kill` send SIGTERM, a terminal SIGINT, closing it SIGHUP
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so that code (ours, Ray's, torch's) that cleans up after
    Ctrl-C cleans up after SIGTERM too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopState:
    pid = 0  # the process that installed the handlers
    previous: dict[int, Any] = {}  # the handlers before
    # the signal that stopped the command: the exception may not carry it (ray.get raises a bare KeyboardInterrupt)
    first: int | None = None


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _StopState.pid:
        # a forked worker (multiprocessing pools, DataLoader) inherited this handler: it reacts as it did before,
        # and its parent, which stops it anyway, does the clean-up
        before = _StopState.previous[signum]
        signal.signal(signum, before)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
        return
    # only the first signal unwinds: a second one (a repeated Ctrl-C, torchrun relaying to its ranks) would
    # interrupt the clean-up the first one started; each clean-up step is bounded, and SIGKILL still works
    for other in STOP_SIGNALS:
        if signal.getsignal(other) is _raise_stopped:
            signal.signal(other, _already_stopping)
    _StopState.first = signum
    raise Stopped(signum)


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    """Stop signals after the first, while the first one's clean-up runs."""


def stopped_by() -> int:
    """The stop signal that arrived (SIGINT for a KeyboardInterrupt without one)."""
    return _StopState.first or signal.SIGINT


@contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Stopped in the main thread while the command runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # None: a handler installed outside Python, which Python cannot put back; the default is the nearest
    previous = {signum: signal.SIG_DFL if (handler := signal.getsignal(signum)) is None else handler
                for signum in STOP_SIGNALS}
    _StopState.pid, _StopState.previous, _StopState.first = os.getpid(), previous, None
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:  # nohup, or `cmd &` in a script: ignoring was asked for
            signal.signal(signum, _raise_stopped)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
