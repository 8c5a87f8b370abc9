"""The exceptions featx raises for bad input: the CLI prints each as a single line."""

from __future__ import annotations


class FeatxError(Exception):
    """A user-facing error: bad arguments, bad data, missing weights or an incompatible cache."""


class OptionError(FeatxError):
    """A bad value for one named option (a parameter of the API); the CLI names its flag."""

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = problem
        super().__init__(f"{option} {problem}")
