"""The `featx` command: a thin typer layer over featx.study and featx.report."""

from featx.cli.main import main

__all__ = ["main"]
