"""How the command shows what the library says: its log records as lines on stderr, and an
extraction's progress as a live bar on a terminal (as the library's log lines elsewhere)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class StderrLines(logging.Handler):
    """featx's log records as lines on the stderr of the moment: a warning as `warning: ...`
    (yellow on a terminal), anything else as it is."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # a record whose arguments do not fit its message
            text = str(record.msg)
        if record.levelno >= logging.WARNING:
            colour = sys.stderr.isatty()
            text = (typer.style("warning:", fg="yellow") if colour else "warning:") + " " + text
        typer.echo(text, err=True)


@contextmanager
def showing_logs() -> Iterator[None]:
    """While a command runs, featx's INFO records and above are shown on stderr."""
    logger = logging.getLogger("featx")
    handler, level = StderrLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} images/s" if speed else "", style="cyan")


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A live bar where stderr is a terminal; the library's log lines elsewhere (a log, CI)."""
    if not sys.stderr.isatty():
        from featx.extract.run import logged_progress

        with logged_progress(description) as advance:
            yield advance
        return
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(escape(description), total=None)
        yield lambda n, total: bar.update(task, total=total, advance=n)
