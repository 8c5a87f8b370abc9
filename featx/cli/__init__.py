"""The `featx` command: a thin typer layer over featx.study and featx.report."""

from __future__ import annotations

import signal
import sys
import threading


def main(args: list[str] | None = None) -> int:
    """The entry point: Ctrl-C and SIGTERM are answered with one line from the first moment, while
    the command's libraries load too; then the command runs (featx.cli.main)."""
    if threading.current_thread() is not threading.main_thread():
        from featx.cli.main import main as run

        return run(args)
    previous = {sig: signal.signal(sig, _stopped_while_starting) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        from featx.cli.main import main as run

        return run(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped_while_starting(signum, frame) -> None:
    """Before the command runs nothing has been computed: the one line, no traceback."""
    name = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    sys.stderr.write(f"featx: {name} while starting; nothing was done\n")
    sys.exit(143 if signum == signal.SIGTERM else 130)


__all__ = ["main"]
