"""Extraction progress: a live bar on a terminal, a plain line now and then in a log."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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

Advance = Callable[[int, int], None]  # (images just done, images in all)


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} images/s" if speed else "", style="cyan")


class LogLines:
    """Progress for output that is not a terminal (a log file, CI): one line every `every`
    seconds and one at the end, with the rate and the time left."""

    def __init__(self, console: Console, description: str, every: float = 30.0) -> None:
        self.console, self.description, self.every = console, description, every
        self.done = 0
        self.started = self.last = time.monotonic()

    def __call__(self, n: int, total: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every and self.done < total:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (total - self.done) / rate if rate else 0.0
        self.console.print(f"{self.description}: {self.done}/{total} images, {rate:.1f} images/s, "
                           f"{left:.0f} s left", markup=False, highlight=False)


@contextmanager
def extraction_progress(console: Console, description: str, enabled: bool = True) -> Iterator[Advance]:
    """Yield the function that extraction calls after each batch."""
    if enabled and not console.is_terminal:
        yield LogLines(console, description)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
                  transient=False) as bar:
        task = bar.add_task(escape(description), total=None)
        yield lambda n, total: bar.update(task, total=total, advance=n)
