"""The `featx` command: a thin typer layer over featx.study and featx.report."""

from featx.cli.app import app, main

__all__ = ["app", "main"]
