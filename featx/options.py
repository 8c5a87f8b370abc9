"""Option values, checked once where they enter: the named choices as enums, the one device parser,
the memory budget, and the places featx writes (a folder or a file it must be able to write)."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from enum import Enum
from pathlib import Path
from typing import TypeVar

from featx.errors import FeatxError, OptionError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A named choice: its value is what a user types, and str() gives that value."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls: type[C], value: object, option: str) -> C:
        """The member `value` names (a member or its text), else an OptionError for `option`."""
        try:
            return cls(value)
        except ValueError:
            raise OptionError(option, f"must be one of {cls.names()}, not {value!r}") from None

    @classmethod
    def names(cls) -> str:
        return ", ".join(member.value for member in cls)


class Precision(Choice):
    """The forward pass's arithmetic."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Dtype(Choice):
    """The cached features' type."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"


class Decode(Choice):
    """How image files become crops: PIL worker processes, or batches decoded on the device."""

    AUTO = "auto"
    PIL = "pil"
    DEVICE = "device"


class Tta(Choice):
    """Test-time augmentation: none, or each image's features averaged with its mirror's."""

    NONE = "none"
    FLIP = "flip"


class Verify(Choice):
    """How a cached image is recognised: its size and modification time, or its bytes too."""

    SIZE = "size"
    HASH = "hash"


class Scaling(Choice):
    """How a probe scales the features before training."""

    L2 = "l2"
    STANDARDIZE = "standardize"
    NONE = "none"


class Solver(Choice):
    """Which solver fits the linear probes."""

    AUTO = "auto"
    TORCH = "torch"
    LIBLINEAR = "liblinear"


# --- devices ----------------------------------------------------------------------------------
def parse_device(text: str, option: str = "device") -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked as text (no torch needed)."""
    value = str(text).strip().lower()
    if value not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", value):
        raise OptionError(option, f"must be auto, cpu, cuda or cuda:N, not {text!r}")
    return value


def resolve_device(text: str = "auto"):
    """The torch.device a parsed device names: `auto` is CUDA where there is a GPU; a CUDA device
    asked for where there is none is a FeatxError."""
    import torch

    value = parse_device(text)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise FeatxError(f"device {value} asked for, but no CUDA GPU is available")
    return torch.device(value)


def resolve_precision(precision: str, device) -> Precision:
    """`auto` is bf16 on a GPU that supports it (else fp16) and fp32 on a CPU, so that a CPU's
    features, and the accuracies measured on them, do not depend on its model (bf16 stays one
    option away: measured faster on CPUs with native bf16, see benchmarks/README.md)."""
    precision = Precision.parse(precision, "precision")
    if precision != Precision.AUTO:
        return precision
    if device.type == "cuda":
        import torch

        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
    return Precision.FP32


def resolve_dtype(dtype: str, device) -> Dtype:
    """`auto` is float16 on a GPU (measured on 15-Scene: accuracy within 0.1 point of float32,
    half the bytes to copy and write) and float32 on a CPU."""
    dtype = Dtype.parse(dtype, "dtype")
    if dtype == Dtype.AUTO:
        return Dtype.FLOAT16 if device.type == "cuda" else Dtype.FLOAT32
    return dtype


def resolve_decode(decode: str, device) -> Decode:
    """`auto` is device decoding on a GPU (nvJPEG decodes a batch far faster than CPU workers can)
    and PIL workers on a CPU, where they measured faster than one thread of libjpeg-turbo."""
    decode = Decode.parse(decode, "decode")
    if decode != Decode.AUTO:
        return decode
    return Decode.DEVICE if device.type == "cuda" else Decode.PIL


# --- counts: what this machine can do ----------------------------------------------------------
MAX_BATCH = 4096  # images per forward pass
MAX_SPLITS = 100  # random splits a table repeats its probes on
MAX_PER_CLASS = 1_000_000  # training images per class
MAX_CHANNELS = 1024  # feature maps one activation grid draws
MAX_SEED = 2**32 - 1
C_RANGE = (1e-6, 1e6)  # values of C a linear SVM on l2-scaled features can tell apart
MAX_PIXELS = 200_000_000  # the default --max-pixels: a larger image is skipped, never decoded
MAX_SHARD = 1 << 16  # images per shard (wide layers get fewer: featx.cache.store.SHARD_BYTES)
WORKER_BYTES = 512 << 20  # what one decoding worker process may take


def usable_cores() -> int:
    """The cores this process may run on (its affinity, under a scheduler's limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def total_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 8 << 30


def max_workers() -> int:
    """The most decoding processes featx starts: 4 per usable core, within the memory."""
    return max(1, min(4 * usable_cores(), total_memory() // WORKER_BYTES))


def check_count(option: str, value: object, most: int, *, least: int = 1, optional: bool = False,
                why: str = "") -> None:
    """A whole number from `least` to `most` (None too where `optional`), else an OptionError."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
        reason = f" ({why})" if why else ""
        raise OptionError(option, f"must be a whole number from {least} to {most}{reason}, not {value!r}")


# --- memory -----------------------------------------------------------------------------------
DEFAULT_MEMORY = 2 << 30
MIN_MEMORY = 64 << 20
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str | int) -> int:
    """Bytes from `2G`, `512M`, `1.5GB` (at least MIN_MEMORY), or an int of bytes taken as given
    (the API's way to test a tiny budget)."""
    if isinstance(text, int):
        if text < 1:
            raise OptionError("memory", f"must be a positive number of bytes, not {text}")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not match:
        raise OptionError("memory", f"must be a size such as 2G or 512M, not {text!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value > total_memory():
        raise OptionError("memory", f"is {text}, more than this machine's {describe_bytes(total_memory())} "
                          "of memory")
    if value < MIN_MEMORY:
        raise OptionError("memory", f"must be at least {MIN_MEMORY >> 20}M (the program itself needs "
                          f"that much beside the features), not {text!r}")
    return value


def describe_bytes(n: int) -> str:
    return f"{n / (1 << 30):.1f}G" if n >= 1 << 30 else f"{max(1, -(-n >> 20))}M"


# --- places featx writes ----------------------------------------------------------------------
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
