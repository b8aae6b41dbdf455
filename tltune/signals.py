"""Ctrl-C (SIGINT), SIGTERM and SIGHUP end a sweep the same way at any moment: what finished
is kept, nothing unfinished is marked finished, Ray is shut down, and the command exits
130 / 143 / 129.

:func:`install` makes both signals raise :class:`Interrupted` in the main thread. While a
phase that can stop gracefully runs (a Tune sweep, which then saves its state one last
time), :func:`graceful` hands the first signal to that phase instead; a second signal
raises at once.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
from typing import Callable, Iterator

# SIGHUP: the terminal closed. Its default ends the process at once and leaves Ray's processes
# behind; handled like SIGTERM, the sweep saves its state and Ray is shut down (exit 129).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Sent by machines (Slurm's notice before a time limit, systemd, a closed terminal), not typed.
MACHINE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

_graceful_stop: Callable[[], None] | None = None
_received: list[int] = []
_settled = False
_ignoring_at_exit = False


class Interrupted(BaseException):
    """The user stopped the run. A BaseException, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: str | None = None  # set once the run directory holds something to resume

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handle(signum: int, frame) -> None:
    global _graceful_stop
    if _settled and signum in MACHINE_SIGNALS:
        return
    _received.append(signum)
    if _graceful_stop is not None:
        stop, _graceful_stop = _graceful_stop, None  # once: a second signal raises
        stop()
        return
    raise Interrupted(signum)


def install(keep_received: bool = False) -> None:
    """Route SIGINT, SIGTERM and SIGHUP to :class:`Interrupted`, forgetting signals of an earlier
    run in this process unless ``keep_received`` (installing again after a library replaced
    them: Ray's core worker installs its own SIGTERM handler, which prints a C++ stack dump)."""
    global _settled
    if not keep_received:
        _received.clear()
        _settled = False
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handle)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """:func:`install` for a block (a sweep started from Python), then the handlers from before."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def graceful(stop: Callable[[], None]) -> Iterator[None]:
    """Within this block the first signal calls ``stop()``; the block must then end soon by
    itself, and :class:`Interrupted` is raised as it ends."""
    global _graceful_stop
    received = len(_received)
    _graceful_stop = stop
    try:
        yield
    finally:
        _graceful_stop = None
    if len(_received) > received:
        raise Interrupted(_received[-1])


@contextlib.contextmanager
def finishing() -> Iterator[None]:
    """For the end of work whose results are written (trackers told, Ray stopping, the table
    printed), which ends by itself within seconds: the run's first signal is only recorded (a
    later :func:`raise_if_stopped` raises it: the next experiment does not start), a second raises."""
    global _graceful_stop
    _graceful_stop = None if _received else _record_only
    try:
        yield
    finally:
        _graceful_stop = None


def _record_only() -> None:
    pass


def settle() -> None:
    """The command's outcome is decided (its table printed, its exit code known): SIGTERM and
    SIGHUP change nothing from now on, to the process's last instruction. Without this, one
    arriving in the seconds of teardown after Python's own signal handling has ended (torch's
    and Ray's modules and threads freed) kills the process with 143 / 129, and a Slurm job whose
    time-limit notice came just then requeues a finished sweep. Ctrl-C still ends a slow exit."""
    global _settled, _ignoring_at_exit
    _settled = True
    if not _ignoring_at_exit:  # at exit, not now: a process that goes on (a test) keeps its handlers
        _ignoring_at_exit = True
        atexit.register(_ignore_machine_signals_if_settled)


def _ignore_machine_signals_if_settled() -> None:
    if _settled and signal.getsignal(signal.SIGTERM) is _handle:
        for signum in MACHINE_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def raise_if_stopped() -> None:
    """Raise :class:`Interrupted` for a signal received outside a graceful phase (its own
    exception may have been lost, see above); nothing when none was, or when this module's
    handlers are not installed (the signals then belonged to a run that has ended)."""
    if _received and _graceful_stop is None and signal.getsignal(signal.SIGTERM) is _handle:
        raise Interrupted(_received[-1])
