"""The one error type a user can cause and fix (bad name, bad range, missing data...)."""


class UserError(Exception):
    """A problem with the user's input: the CLI prints the message and exits with code 2."""
