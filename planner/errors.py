"""The one exception the CLI turns into a one-line message and exit code 2."""


class MemplanInputError(ValueError):
    """Bad user input: the message names the bad value and what is allowed."""
