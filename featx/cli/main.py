"""The entry point: every outcome of a command is one line on stderr and an exit code (README,
"Exit codes"); Ctrl-C and SIGTERM unwind the command so that nothing computed is lost."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from featx.cli.app import app
from featx.cli.progress import showing_logs
from featx.errors import FeatxError, OptionError
from featx.options import describe

# click's error classes, from the click that typer runs on (newer typer releases carry their own)
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_CLICK_ABORT = getattr(sys.modules[_CLICK_ERROR.__module__], "Abort", typer.Abort)
FLAGS = {"C": "--C", "split_file": "--split"}  # API names whose flag is not --name-with-dashes

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
KEPT = "completed shards are kept and the next run resumes"


def error_line(exc: FeatxError) -> str:
    """The one line a FeatxError becomes; an option's API name becomes its flag."""
    if isinstance(exc, OptionError):
        flag = FLAGS.get(exc.option, "--" + exc.option.replace("_", "-"))
        return f"featx: error: {flag} {exc.problem}"
    return f"featx: error: {exc}"


class Stopped(BaseException):
    """SIGINT or SIGTERM, raised in the main thread so that the command unwinds: decoding
    workers stop, shards handed to the writer are finished, temporary files go."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame) -> None:
    raise Stopped(signum)


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """While a command runs, Ctrl-C and SIGTERM raise Stopped (which no library swallows)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _internal_error(exc: Exception) -> int:
    """One line with the exception's type and the log file that holds the traceback;
    FEATX_DEBUG=1 prints the traceback instead."""
    trace = traceback.format_exc()
    first = str(exc).splitlines()[0] if str(exc).strip() else ""
    if os.environ.get("FEATX_DEBUG") == "1":
        typer.echo(trace, err=True)
        typer.echo(f"featx: internal error: {type(exc).__name__}: {first}", err=True)
        return EXIT_INTERNAL
    log = Path(tempfile.gettempdir()) / f"featx-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.write_text(f"featx {' '.join(sys.argv[1:])}\n{trace}")
        where = f"the traceback is in {log}"
    except OSError:
        where = "run again with FEATX_DEBUG=1 for the traceback"
    typer.echo(f"featx: internal error: {type(exc).__name__}: {first} ({where}; please report it)",
               err=True)
    return EXIT_INTERNAL


def main(args: list[str] | None = None) -> int:
    """Run one command; return its exit code."""
    with _signals_unwind(), showing_logs():
        try:
            code = app(args, standalone_mode=False)
            _leave_ranks(together=True)
        except FeatxError as exc:
            typer.echo(error_line(exc), err=True)
            return EXIT_BAD_INPUT
        except _CLICK_ERROR as exc:
            if exc.format_message():  # empty after the help that a bare `featx` prints
                typer.echo(f"featx: error: {exc.format_message()}", err=True)
            return exc.exit_code
        except OSError as exc:
            if not exc.filename:
                return _internal_error(exc)
            typer.echo(f"featx: error: cannot use {exc.filename}: {describe(exc)}", err=True)
            return EXIT_BAD_INPUT
        except (KeyboardInterrupt, _CLICK_ABORT, typer.Abort):
            typer.echo(f"featx: interrupted; {KEPT}", err=True)
            return EXIT_INTERRUPTED
        except Stopped as stop:
            if stop.signum == signal.SIGTERM:
                typer.echo(f"featx: terminated (SIGTERM); {KEPT}", err=True)
                return EXIT_TERMINATED
            typer.echo(f"featx: interrupted; {KEPT}", err=True)
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - the last resort: one line, traceback in a log
            return _internal_error(exc)
        finally:
            _leave_ranks(together=False)  # after a failure; nothing left to do after the above
    return code if isinstance(code, int) else EXIT_OK


def _leave_ranks(together: bool) -> None:
    """Under torchrun, leave the ranks' process group before the process ends (see Ranks.leave);
    a command that joined none never imported featx.extract.ranks, nor torch for it."""
    if "featx.extract.ranks" in sys.modules:
        sys.modules["featx.extract.ranks"].Ranks.from_env().leave(together)
