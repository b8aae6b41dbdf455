"""The one error type a user can cause and fix (bad name, bad range, missing data...)."""


class UserError(Exception):
    """A problem with the user's input: the CLI prints the message and exits with code 2."""


class TrialsFailed(Exception):
    """Every retry of a trial failed (a deterministic error): its experiment failed. The
    message names the experiment and the first trial's error, on one line."""

    run_dir: str | None = None  # the run holding the failed experiments


class StorageFull(Exception):
    """The run's storage ran out of space mid-run (a full disk, a quota): the sweep stopped,
    the state it last saved whole is kept, and ``--resume`` goes on once there is space.
    The CLI prints the message and exits with code 1."""

    run_dir: str | None = None

    @classmethod
    def at(cls, where: str) -> "StorageFull":
        return cls(f"no space left where the run is stored ({where}): the sweep stopped and kept the state it last saved whole; "
                   "free some space, then continue with --resume")  # fmt: skip


def is_storage_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it wraps (Ray's task errors, ``raise ... from``), is a
    full disk or quota: ENOSPC or EDQUOT, or their text where a library kept only the text."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in ("No space left on device", "Disk quota exceeded", "[errno 28]")):
            return True
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return False
