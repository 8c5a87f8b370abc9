"""Output places, checked before any work starts: a folder featx will write into must be a
folder (or creatable as one) where a file can be made, else an OptionError naming the path."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from featx.errors import OptionError


def writable_folder(path: str | Path, option: str) -> Path:
    """Make `path` if missing and prove a file can be written in it."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError:
        raise OptionError(option, f"{path}: a file is in the way, not a folder") from None
    except NotADirectoryError:
        raise OptionError(option, f"{path}: {_file_in_way(path)} is a file, not a folder") from None
    except OSError as exc:
        raise OptionError(option, f"cannot write in {path}: {describe(exc)}") from None
    return path


def writable_file(path: str | Path, option: str) -> Path:
    """A file featx will write: its folder must be writable and the path must not be a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OptionError(option, f"{path} is a folder; give a file name")
    writable_folder(path.parent, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(option, f"cannot write {path}: {os.strerror(errno.EACCES)}")
    return path


def _file_in_way(path: Path) -> Path:
    """The first part of `path` that exists and is not a folder."""
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.is_dir():
            return parent
    return path


def describe(exc: OSError) -> str:
    """An OS error in words: read-only, permission denied, disk full, ... without a path."""
    return exc.strerror or type(exc).__name__
