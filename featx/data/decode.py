"""Image files -> batches of uint8 crops (N, 3, crop, crop), ready for the forward pass.

Two decoders give the same crops by the same rules:
- `pil` decodes, resizes and crops each file with PIL in DataLoader worker processes;
- `device` reads the files' bytes in threads and decodes the JPEGs of a batch together on the
  device (nvJPEG on a GPU, libjpeg-turbo on a CPU), then resizes and crops them there. A file it
  cannot take as it is (another format, CMYK, an EXIF rotation, a JPEG so large that PIL decodes
  it at reduced size, a JPEG the device decoder refuses) goes through PIL on its own.
A file that cannot be read at all yields a blank crop and its error, with either decoder. Each
image's outcome also carries a remark (a multi-frame file: its first frame is used) and the xxh3-128
of the bytes decoded, which the cache records as what its features were computed from.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from featx.data.images import LARGE_PIXELS, ImageSet, load_image
from featx.data.preprocess import prepare
from featx.models import Preprocess
from featx.options import MAX_PIXELS

EXIF_ORIENTATION = 0x0112
PREFETCH_BATCHES = 2  # batches whose files are read ahead while one is decoded

Batch = tuple[np.ndarray, torch.Tensor, list["Outcome"]]  # image indices, uint8 crops, outcomes


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _error(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    first = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", first)  # the bytes read, not a place
    return f"{type(exc).__name__}: {first}"


@dataclass(frozen=True)
class Outcome:
    """How one image was read: its error ("" when it was read), a remark, and the digest (hex) of
    its bytes ("" when they could not be read)."""

    error: str = ""
    note: str = ""
    digest: str = ""


def pil_crop(images: ImageSet, preprocess: Preprocess, index: int, *, data: bytes | None = None,
             max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, Outcome]:
    """One file decoded and cropped with PIL; a blank crop and the error if it cannot be read."""
    digest = ""
    try:
        data = images.read_bytes(index) if data is None else data
        digest = xxhash.xxh3_128_hexdigest(data)
        image, frames = load_image(data, preprocess.resize, max_pixels)
        note = f"{frames} frames: the first one is used" if frames > 1 else ""
        return prepare(preprocess, image), Outcome(note=note, digest=digest)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, empty or not an image
        blank = torch.zeros(3, preprocess.crop, preprocess.crop, dtype=torch.uint8)
        return blank, Outcome(error=_error(exc), digest=digest)


class ImageFiles(Dataset):
    """The PIL decoder's dataset: index -> (index, uint8 crop, error, note, digest)."""

    def __init__(self, images: ImageSet, preprocess: Preprocess, max_pixels: int) -> None:
        self.images, self.preprocess, self.max_pixels = images, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str, str, str]:
        crop, outcome = pil_crop(self.images, self.preprocess, index, max_pixels=self.max_pixels)
        return index, crop, outcome.error, outcome.note, outcome.digest


def pil_batches(images: ImageSet, preprocess: Preprocess, batches: list[list[int]],
                *, workers: int | None = None, pin_memory: bool = False,
                max_pixels: int = MAX_PIXELS) -> Iterator[Batch]:
    """Each batch decoded by PIL in DataLoader workers, in order, on the host."""
    workers = default_workers() if workers is None else workers
    loader = DataLoader(ImageFiles(images, preprocess, max_pixels), batch_sampler=batches,
                        num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    for indices, pixels, errors, notes, digests in loader:
        yield indices.numpy(), pixels, [Outcome(*fields) for fields in zip(errors, notes, digests)]


def device_can_decode(data: bytes, max_pixels: int = MAX_PIXELS) -> bool:
    """Whether the device decoder takes this file as it is: a JPEG in RGB or grey, not turned by
    EXIF, within LARGE_PIXELS (above it PIL decodes at reduced size, or refuses it past
    `max_pixels`). Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            return (opened.format == "JPEG" and opened.mode in ("RGB", "L")
                    and width * height <= min(LARGE_PIXELS, max_pixels)
                    and opened.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except Exception:  # noqa: BLE001 - PIL will say what is wrong with it
        return False


def _jpeg_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> RGB uint8 (3, H, W) on the device, as one batch; if the batch fails, file by
    file, with None for a file the device decoder refuses."""
    with warnings.catch_warnings():  # torchvision's note that its decoders move to another package
        warnings.simplefilter("ignore")
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded: list[torch.Tensor | None] = []
            for one in data:
                try:
                    decoded.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=device)[0])
                except RuntimeError:
                    decoded.append(None)
            return decoded


def _crop_all(preprocess: Preprocess, decoded: list[torch.Tensor]) -> list[torch.Tensor]:
    """Resize and crop decoded images; images of one size are resized together in one call."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(decoded):
        by_size.setdefault(tuple(image.shape), []).append(k)
    crops: list[torch.Tensor] = [torch.empty(0)] * len(decoded)
    for positions in by_size.values():
        group = prepare(preprocess, torch.stack([decoded[k] for k in positions]))
        for k, crop in zip(positions, group):
            crops[k] = crop
    return crops


def device_batches(images: ImageSet, preprocess: Preprocess, batches: list[list[int]],
                   *, device: torch.device, workers: int | None = None,
                   max_pixels: int = MAX_PIXELS) -> Iterator[Batch]:
    """Each batch decoded on the device, in order: files read ahead in threads, the batch's JPEGs
    decoded together, the other files through PIL in the threads."""
    threads = max(1, default_workers() if workers is None else workers)

    def read(index: int) -> tuple[torch.Tensor | None, torch.Tensor | None, Outcome]:
        """(JPEG bytes, None, outcome) for the device, or (None, PIL crop, outcome)."""
        try:
            data = images.read_bytes(index)
        except OSError:
            return None, *pil_crop(images, preprocess, index, max_pixels=max_pixels)  # PIL words the error
        if device_can_decode(data, max_pixels):
            return (torch.frombuffer(bytearray(data), dtype=torch.uint8), None,
                    Outcome(digest=xxhash.xxh3_128_hexdigest(data)))
        return None, *pil_crop(images, preprocess, index, data=data, max_pixels=max_pixels)

    queued = iter(batches)
    ahead: deque[tuple[list[int], list[Future]]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="featx-read") as pool:

        def read_next() -> None:
            batch = next(queued, None)
            if batch is not None:
                ahead.append((batch, [pool.submit(read, i) for i in batch]))

        for _ in range(PREFETCH_BATCHES + 1):
            read_next()
        while ahead:
            batch, futures = ahead.popleft()
            read_next()  # PREFETCH_BATCHES batches read while this one decodes
            yield _decoded_batch(images, preprocess, device, batch=batch,
                                 results=[f.result() for f in futures], max_pixels=max_pixels)


def _decoded_batch(images: ImageSet, preprocess: Preprocess, device: torch.device, *, batch: list[int],
                   results: list[tuple[torch.Tensor | None, torch.Tensor | None, Outcome]],
                   max_pixels: int) -> Batch:
    """One batch's read results -> its crops on the device: the JPEGs decoded together, a file
    the device decoder refuses through PIL."""
    indices = np.array(batch, dtype=np.int64)
    host = {k: crop for k, (data, crop, _) in enumerate(results) if data is None}  # PIL's crops
    outcomes = [outcome for _, _, outcome in results]
    jpeg = [k for k, (data, _, _) in enumerate(results) if data is not None]
    decoded = dict(zip(jpeg, _jpeg_decode([results[k][0] for k in jpeg], device))) if jpeg else {}
    for k in (k for k, image in decoded.items() if image is None):  # refused: through PIL
        host[k], outcomes[k] = pil_crop(images, preprocess, int(indices[k]),
                                        data=results[k][0].numpy().tobytes(), max_pixels=max_pixels)
    crops: list[torch.Tensor | None] = [None] * len(batch)
    kept = [k for k, image in decoded.items() if image is not None]
    for k, crop in zip(kept, _crop_all(preprocess, [decoded[k] for k in kept])):
        crops[k] = crop
    if host:  # one copy without waiting: a copy per crop would each wait for the device's queue
        for k, crop in zip(host, torch.stack(list(host.values())).to(device, non_blocking=True)):
            crops[k] = crop
    return indices, torch.stack(crops), outcomes
