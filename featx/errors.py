"""The one exception type featx raises for bad input: the CLI prints it as a single line."""


class FeatxError(Exception):
    """A user-facing error: bad arguments, bad data, missing weights or an incompatible cache."""
