"""Image files -> batches of uint8 crops (N, 3, crop, crop), ready for the forward pass.

Two decoders give the same crops by the same rules:
- `pil` decodes, resizes and crops each file with PIL in DataLoader worker processes;
- `device` reads the files' bytes in threads and decodes the JPEGs of a batch together on the
  device (nvJPEG on a GPU, libjpeg-turbo on a CPU), then resizes and crops them there. A file it
  cannot take as it is (another format, CMYK, an EXIF rotation, a JPEG so large that PIL decodes
  it at reduced size, a JPEG the device decoder refuses) goes through PIL on its own.
A file that cannot be read at all yields a blank crop and its error, with either decoder.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from featx.data.images import LARGE_PIXELS, ImageSet, load_image
from featx.data.preprocess import prepare
from featx.models import Preprocess
from featx.options import Decode

EXIF_ORIENTATION = 0x0112
PREFETCH_BATCHES = 2  # batches whose files are read ahead while one is decoded

Batch = tuple[np.ndarray, torch.Tensor, list[str]]  # image indices, uint8 crops, errors ("" = read)


def resolve_decode(decode: str, device: torch.device) -> Decode:
    """`auto` is device decoding on a GPU (nvJPEG decodes a batch far faster than CPU workers can)
    and PIL workers on a CPU, where they measured faster than one thread of libjpeg-turbo."""
    decode = Decode.parse(decode, "decode")
    if decode != Decode.AUTO:
        return decode
    return Decode.DEVICE if device.type == "cuda" else Decode.PIL


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _error(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def pil_crop(images: ImageSet, preprocess: Preprocess, index: int) -> tuple[torch.Tensor, str]:
    """One file decoded and cropped with PIL; a blank crop and the error if it cannot be read."""
    try:
        return prepare(preprocess, load_image(images.source(index), preprocess.resize)), ""
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, empty or not an image
        return torch.zeros(3, preprocess.crop, preprocess.crop, dtype=torch.uint8), _error(exc)


class ImageFiles(Dataset):
    """The PIL decoder's dataset: index -> (index, uint8 crop, error)."""

    def __init__(self, images: ImageSet, preprocess: Preprocess) -> None:
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        return index, *pil_crop(self.images, self.preprocess, index)


def pil_batches(images: ImageSet, preprocess: Preprocess, batches: list[list[int]],
                *, workers: int | None = None, pin_memory: bool = False) -> Iterator[Batch]:
    """Each batch decoded by PIL in DataLoader workers, in order, on the host."""
    workers = default_workers() if workers is None else workers
    loader = DataLoader(ImageFiles(images, preprocess), batch_sampler=batches, num_workers=workers,
                        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    for indices, pixels, errors in loader:
        yield indices.numpy(), pixels, list(errors)


def device_can_decode(data: bytes) -> bool:
    """Whether the device decoder takes this file as it is: a JPEG in RGB or grey, not turned by
    EXIF, within LARGE_PIXELS (above it PIL decodes at reduced size). Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            return (opened.format == "JPEG" and opened.mode in ("RGB", "L")
                    and width * height <= LARGE_PIXELS
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
                   *, device: torch.device, workers: int | None = None) -> Iterator[Batch]:
    """Each batch decoded on the device, in order: files read ahead in threads, the batch's JPEGs
    decoded together, the other files through PIL in the threads."""
    threads = max(1, default_workers() if workers is None else workers)

    def read(index: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        """(JPEG bytes, None, "") for the device, or (None, PIL crop, error)."""
        try:
            data = images.read_bytes(index)
        except OSError:
            return None, *pil_crop(images, preprocess, index)  # PIL words the error
        if device_can_decode(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), None, ""
        return None, *pil_crop(images, preprocess, index)

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
                                 results=[f.result() for f in futures])


def _decoded_batch(images: ImageSet, preprocess: Preprocess, device: torch.device, *, batch: list[int],
                   results: list[tuple[torch.Tensor | None, torch.Tensor | None, str]]) -> Batch:
    """One batch's read results -> its crops on the device: the JPEGs decoded together, a file
    the device decoder refuses through PIL."""
    indices = np.array(batch, dtype=np.int64)
    host = {k: crop for k, (data, crop, _) in enumerate(results) if data is None}  # PIL's crops
    errors = [error for _, _, error in results]
    jpeg = [k for k, (data, _, _) in enumerate(results) if data is not None]
    decoded = dict(zip(jpeg, _jpeg_decode([results[k][0] for k in jpeg], device))) if jpeg else {}
    for k in (k for k, image in decoded.items() if image is None):  # refused: through PIL
        host[k], errors[k] = pil_crop(images, preprocess, int(indices[k]))
    crops: list[torch.Tensor | None] = [None] * len(batch)
    kept = [k for k, image in decoded.items() if image is not None]
    for k, crop in zip(kept, _crop_all(preprocess, [decoded[k] for k in kept])):
        crops[k] = crop
    if host:  # one copy without waiting: a copy per crop would each wait for the device's queue
        for k, crop in zip(host, torch.stack(list(host.values())).to(device, non_blocking=True)):
            crops[k] = crop
    return indices, torch.stack(crops), errors
