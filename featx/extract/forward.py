"""Batches -> one forward pass -> the requested layers, on CPU or GPU.

The network is traced once (torchvision's feature extraction) so that one pass returns every
requested layer and stops at the deepest of them. Batches of uint8 crops come from `decode`;
normalisation runs on the device. The features are converted to the cache's dtype on the device
and copied to the host without waiting (on a GPU: pinned memory, a copy stream of its own), so the
next batch's forward pass runs while the last one's features travel.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from featx.cache.dtypes import check_stored, to_stored
from featx.data.decode import Batch, device_batches, pil_batches
from featx.data.images import ImageSet
from featx.data.preprocess import normalize
from featx.errors import OptionError
from featx.extract.rewrite import for_inference, without_inplace
from featx.models import Layer, LoadedModel, Preprocess
from featx.options import MAX_PIXELS, Tta, resolve_decode, resolve_device, resolve_dtype, resolve_precision

CPU_BATCH = 32  # the batch size on a CPU when none is given
GPU_BATCH_CAP = 256  # the largest batch chosen on a GPU: beyond it throughput no longer grows
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def batch_that_fits(per_image: float, free: int, cap: int = GPU_BATCH_CAP) -> int:
    """The largest power-of-two batch, at most `cap`, whose forward pass takes at most half of
    `free` bytes, given what one image takes; at least 1."""
    size = 1
    while size * 2 <= cap and size * 2 * per_image <= free / 2:
        size *= 2
    return size


@dataclass
class HostFeatures:
    """One batch's features on their way to the host, in the cache's dtype."""

    values: dict[str, torch.Tensor]
    problems: dict[str, torch.Tensor]  # a stored.to_stored problem code per layer, on the host
    copied: torch.cuda.Event | None = None

    def wait(self) -> dict[str, torch.Tensor]:
        """The features, once their copy is done; a layer the cache's dtype would misrepresent
        raises FeatxError."""
        if self.copied is not None:
            self.copied.synchronize()
        for name, code in self.problems.items():
            check_stored(name, int(code))
        return self.values


class LayerExtractor:
    """One traced forward pass that returns the requested layers as host tensors in `dtype`
    (`auto`: float16 on a GPU, float32 on a CPU); `decode` says how files become crops. The
    traced graph is rewritten for inference (see `rewrite`) unless `rewrite` is False."""

    def __init__(self, model: LoadedModel, layers: Sequence[Layer], device: str = "auto",
                 *, precision: str = "auto", channels_last: bool = True, tta: str = "none",
                 dtype: str = "float32", decode: str = "auto", rewrite: bool = True,
                 max_pixels: int = MAX_PIXELS) -> None:
        self.model = model
        self.max_pixels = max_pixels
        self.layers = list(layers)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.decode = resolve_decode(decode, self.device)
        self.channels_last = channels_last
        self.tta = Tta.parse(tta, "tta")
        module = without_inplace(model.module)
        nodes = {layer.node: layer.node for layer in self.layers}
        tracer_kwargs = model.spec.zoo.tracer_kwargs(model.spec.name)
        with warnings.catch_warnings():  # its train/eval node note does not apply: eval only
            warnings.simplefilter("ignore", UserWarning)
            graph = create_feature_extractor(module, return_nodes=nodes, tracer_kwargs=tracer_kwargs)
        self.graph = (for_inference(graph) if rewrite else graph).eval().to(self.device)
        if channels_last:
            self.graph = self.graph.to(memory_format=torch.channels_last)
        self.copies = None  # on a GPU, the stream that copies features to the host
        if self.device.type == "cuda":  # one input size throughout: let cuDNN time its kernels once
            torch.backends.cudnn.benchmark = True
            self.copies = torch.cuda.Stream(self.device)

    @property
    def preprocess(self) -> Preprocess:
        return self.model.preprocess

    def autocast(self):
        """The autocast context of the chosen precision (none for fp32)."""
        dtype = _DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (N, 3, H, W) -> {layer name: (N, dim)} on the device, in the compute
        precision, each layer reduced to a vector as its table says."""
        x = normalize(self.preprocess, images.to(self.device, non_blocking=True))
        if self.tta == "flip":  # each image and its mirror in one batch twice the size
            x = torch.cat([x, x.flip(-1)])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.graph(x)
        vectors = {layer.name: to_vectors(layer, out[layer.node]) for layer in self.layers}
        if self.tta == "flip":
            n = len(images)
            vectors = {name: (v[:n] + v[n:]) / 2 for name, v in vectors.items()}
        return vectors

    def launch(self, images: torch.Tensor) -> HostFeatures:
        """Queue the forward pass and the copy of its features to the host (see `to_host`)."""
        return self.to_host(self.forward(images))

    @torch.inference_mode()
    def to_host(self, values: dict[str, torch.Tensor]) -> HostFeatures:
        """Features on the device -> the host, in the cache's dtype, converted and checked where
        they are. On a GPU the copy runs on a stream of its own into pinned memory, so that it
        overlaps the next batch's forward pass; this returns before it is done."""
        stored = {name: to_stored(value, self.dtype) for name, value in values.items()}
        if self.copies is None:
            return HostFeatures({name: v for name, (v, _) in stored.items()},
                                {name: code for name, (_, code) in stored.items()})
        host = {name: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for name, (v, _) in stored.items()}
        problems = {name: torch.empty((), dtype=torch.int8, pin_memory=True) for name in stored}
        self.copies.wait_stream(torch.cuda.current_stream(self.device))  # after the conversion
        with torch.cuda.stream(self.copies):
            for name, (value, code) in stored.items():
                host[name].copy_(value, non_blocking=True)
                problems[name].copy_(code, non_blocking=True)
                value.record_stream(self.copies)  # not reused by the next batch before copied
                code.record_stream(self.copies)
            copied = torch.cuda.Event()
            copied.record(self.copies)
        return HostFeatures(host, problems, copied)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (N, 3, H, W) -> {layer name: (N, dim) on the host, in the cache's dtype}."""
        return self.launch(images).wait()

    def batch_size(self) -> int:
        """CPU_BATCH on a CPU; on a GPU the largest batch that fits (see batch_that_fits), from
        the memory one forward pass of 8 images takes."""
        if self.device.type != "cuda":
            return CPU_BATCH
        probe = 8
        crop = self.preprocess.crop
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.forward(torch.zeros(probe, 3, crop, crop, dtype=torch.uint8, device=self.device))
        per_image = (torch.cuda.max_memory_allocated(self.device) - before) / probe
        free, _ = torch.cuda.mem_get_info(self.device)
        return batch_that_fits(per_image * (2 if self.tta == "flip" else 1), free)


def to_vectors(layer: Layer, output: torch.Tensor) -> torch.Tensor:
    """A layer's output for a batch -> (N, dim), by the layer's reduction."""
    if layer.reduce == "avgpool":
        return F.adaptive_avg_pool2d(output, 1).flatten(1)
    if layer.reduce == "avgpool_nhwc":
        return output.mean(dim=(1, 2))
    if layer.reduce == "cls_token":
        return output[:, 0]
    if layer.reduce == "mean_tokens":
        return output[:, layer.prefix_tokens:].mean(dim=1)
    return output.flatten(1)


@dataclass
class ExtractedBatch:
    """Features of the readable images of one batch, the files that could not be read, remarks
    (a multi-frame file), and the digest of every file's bytes that were read."""

    indices: np.ndarray
    features: dict[str, np.ndarray]
    skipped: dict[int, str]
    notes: dict[int, str] = field(default_factory=dict)
    digests: dict[int, bytes] = field(default_factory=dict)


def decoded_batches(extractor: LayerExtractor, images: ImageSet,
                    batches: list[list[int]], *, workers: int | None = None) -> Iterator[Batch]:
    """(indices, uint8 crops, outcomes) per batch, by the extractor's decoder."""
    if extractor.decode == "device":
        return device_batches(images, extractor.preprocess, batches, device=extractor.device, workers=workers,
                              max_pixels=extractor.max_pixels)
    return pil_batches(images, extractor.preprocess, batches, workers=workers,
                       pin_memory=extractor.device.type == "cuda", max_pixels=extractor.max_pixels)


def extract_batches(extractor: LayerExtractor, images: ImageSet, batches: list[list[int]],
                    *, workers: int | None = None) -> Iterator[ExtractedBatch]:
    """Run the extractor over batches of image indices, dropping unreadable images. Each batch's
    forward pass is queued before the previous batch's features are waited for."""
    waiting: tuple[ExtractedBatch, HostFeatures | None] | None = None
    for indices, pixels, outcomes in decoded_batches(extractor, images, batches, workers=workers):
        ok = np.array([not o.error for o in outcomes], dtype=bool)
        batch = ExtractedBatch(
            indices[ok], {}, skipped={int(i): o.error for i, o in zip(indices, outcomes) if o.error},
            notes={int(i): o.note for i, o in zip(indices, outcomes) if o.note},
            digests={int(i): bytes.fromhex(o.digest) for i, o in zip(indices, outcomes) if o.digest})
        readable = pixels if ok.all() else pixels.index_select(  # picked without waiting for the device
            0, torch.from_numpy(np.flatnonzero(ok)).to(pixels.device, non_blocking=True))
        launched = extractor.launch(readable) if ok.any() else None
        if waiting is not None:
            yield _finished(extractor, waiting)
        waiting = (batch, launched)
    if waiting is not None:
        yield _finished(extractor, waiting)


def _finished(extractor: LayerExtractor, waiting: tuple[ExtractedBatch,
                                                        HostFeatures | None]) -> ExtractedBatch:
    batch, launched = waiting
    if launched is None:
        dtype = np.dtype(extractor.dtype)
        batch.features = {layer.name: np.zeros((0, layer.dim), dtype) for layer in extractor.layers}
    else:
        batch.features = {name: v.numpy() for name, v in launched.wait().items()}
    return batch


def batches_of(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise OptionError("batch_size", f"must be at least 1, not {batch_size}")
    return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
