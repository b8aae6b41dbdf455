"""The one error type a user can cause and fix (bad name, bad range, missing data...)."""


class UserError(Exception):
    """A problem with the user's input: the CLI prints the message and exits with code 2."""


class TrialsFailed(Exception):
    """Every retry of a trial failed (a deterministic error): its experiment failed. The
    message names the experiment and the first trial's error, on one line."""

    run_dir: str | None = None  # the run holding the failed experiments
