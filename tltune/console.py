"""What a sweep prints: everything (the command line's default), or with ``--quiet`` (and in
``tltune.run``) only a count of trials per state at most once a minute and the final table."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import TextIO

_counts_to: TextIO | None = None  # while quiet: where the per-state counts still go


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def is_quiet() -> bool:
    return _counts_to is not None


def counts_stream() -> TextIO:
    """Where the per-state trial counts go: the real stdout, also while quiet."""
    return _counts_to or sys.stdout


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Swallow what the sweep prints to stdout (warnings and errors still reach stderr)."""
    global _counts_to
    if not enabled or _counts_to is not None:
        yield
        return
    _counts_to = sys.stdout
    try:
        with contextlib.redirect_stdout(_Discard()):
            yield
    finally:
        _counts_to = None


@contextlib.contextmanager
def quiet_logger(name: str):
    """Logger ``name`` prints only errors within the block (a library's notices tltune replaces or makes moot)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
