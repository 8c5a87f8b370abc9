"""A cached layer, or a combination `a+b`, read shard by shard in blocks of rows, scaled, as torch
tensors on the probe's device: what every probe trains and tests on without holding a layer.

The memory budget (`--memory`) bounds what a probe holds at once: one block of rows in flight,
plus what the probe keeps (training rows or their Gram matrix, a block of scores). Each probe asks
`rows_within` how many rows of this layer fit in the share of the budget it has left.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import reduce

import numpy as np
import torch

from featx.cache.store import FeatureStore
from featx.errors import FeatxError
from featx.extract.ranks import Ranks
from featx.options import Scaling, describe_bytes, resolve_device

BLOCK_BYTES = 32 << 20  # rows read at a time, in float32: large enough for fast matrix products
Block = tuple[np.ndarray, torch.Tensor]  # positions in the stream's rows, and those rows


class LayerStream:
    """The rows every part of `name` holds (a combination needs all its parts), in dataset
    order, read in blocks; `scaling` is applied per block (standardize: with the mean and scale of
    the rows given to `fit_scaling`)."""

    def __init__(self, store: FeatureStore, name: str, scaling: str = Scaling.L2,
                 *, device: str = "auto") -> None:
        self.store, self.name, self.scaling = store, name, Scaling.parse(scaling, "scaling")
        self.parts = name.split("+")
        self.ranks = Ranks.from_env()  # under torchrun, every pass over the layer is shared out
        self.device = str(resolve_device(self.ranks.device(device)))  # each rank on its own GPU
        self.ranks.join(torch.device(self.device))
        self.index = reduce(np.intersect1d, [store.layer_index(part) for part in self.parts])
        self.labels = np.asarray(store.labels[self.index], dtype=np.int64)
        self.dim = sum(store.manifest.layers[part].dim for part in self.parts)
        self.mean: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.held: torch.Tensor | None = None  # the whole layer, unscaled, once `hold` took it
        self.memo: dict = {}  # what a probe derived from these rows that the next probe can reuse

    @property
    def row_bytes(self) -> int:
        """Bytes of one row in float32, as a probe holds it."""
        return 4 * self.dim

    def block_rows(self, budget: int) -> int:
        """Rows per block read: BLOCK_BYTES of them, or an eighth of `budget` when that is less (a
        block in flight costs about four times its size: as stored, in float32, selected, scaled)."""
        return self.rows_within(min(BLOCK_BYTES, budget // 8), "a block")

    def block_flops(self, rows: int) -> float:
        """Floating-point operations of a block of this layer (BLOCK_BYTES of rows at most) times
        `rows` rows: the largest operation of a pass over the layer, which sizes its threads."""
        block = min(len(self.index), max(1, BLOCK_BYTES // self.row_bytes))
        return 2.0 * block * rows * self.dim

    def rows_within(self, budget: int, what: str) -> int:
        """How many rows fit in `budget` bytes; a budget too small for one row is a clear error."""
        rows = budget // self.row_bytes
        if rows < 1:
            raise FeatxError(f"the memory budget is too small for {what} of layer {self.name} "
                             f"({self.dim} values a row): --memory {describe_bytes(8 * self.row_bytes)} "
                             "or more would work")
        return int(rows)

    def budget_left(self, budget: int) -> int:
        """What a probe may use beside the layer held in memory: the whole layer is held (see
        `hold`) when it fits half the budget. On a GPU the budget is at most 90% of the memory
        the card has free."""
        if self.device.startswith("cuda") and self.held is None:
            budget = min(budget, int(0.9 * torch.cuda.mem_get_info(torch.device(self.device))[0]))
        self.hold(budget // 2)
        return budget - (self.held.numel() * 4 if self.held is not None else 0)

    def hold(self, budget: int) -> bool:
        """Read the whole layer into memory once, when it fits `budget`, so that later passes do
        not read the cache again; says whether it did."""
        if self.held is None and len(self.index) * self.row_bytes <= budget:
            held = torch.empty((len(self.index), self.dim), dtype=torch.float32, device=self.device)
            filled = 0
            for block in self._raw_blocks(self.block_rows(budget)):
                held[filled:filled + len(block)] = torch.from_numpy(np.ascontiguousarray(block))
                filled += len(block)
            self.held = held
        return self.held is not None

    def blocks(self, rows: int, positions: np.ndarray | None = None, scaled: bool = True,
               ) -> Iterator[Block]:
        """(positions in `index`, float32 rows on the device, scaled unless `scaled` is False) for
        the rows at `positions` (sorted; all rows when None), at most `rows` of the layer read at a
        time."""
        rows = max(1, rows)
        for here, block in (self._held_blocks(rows, positions) if self.held is not None
                            else self._read_blocks(rows, positions)):
            yield here, self._scaled(block) if scaled else block

    def _held_blocks(self, rows: int, positions: np.ndarray | None) -> Iterator[Block]:
        wanted = np.arange(len(self.index)) if positions is None else positions
        for start in range(0, len(wanted), rows):
            here = wanted[start:start + rows]
            yield here, self.held[torch.as_tensor(here, device=self.device)]

    def _read_blocks(self, rows: int, positions: np.ndarray | None) -> Iterator[Block]:
        start = int(positions[0]) if positions is not None and len(positions) else 0
        if positions is not None and not len(positions):
            return
        last = int(positions[-1]) if positions is not None else len(self.index) - 1
        for raw in self._raw_blocks(rows, int(self.index[start]) if len(self.index) else 0):
            here = np.arange(start, start + len(raw))
            start += len(raw)
            wanted = np.isin(here, positions, assume_unique=True) if positions is not None else None
            if wanted is None or wanted.any():
                block = raw if wanted is None else raw[wanted]
                yield (here if wanted is None else here[wanted]), \
                    torch.from_numpy(np.ascontiguousarray(block)).to(self.device)
            if start > last:  # past the last row wanted: the shards after it are not read
                return

    def gather(self, positions: np.ndarray, budget: int, what: str) -> torch.Tensor:
        """The scaled rows at `positions`, held together (checked against `budget` first)."""
        if len(positions) * self.row_bytes > budget:
            need = len(positions) * self.row_bytes * 2
            raise FeatxError(f"{what} of layer {self.name} ({len(positions)} rows of {self.dim} values) "
                             f"do not fit the memory budget: --memory {describe_bytes(need)} would work")
        out = torch.empty((len(positions), self.dim), dtype=torch.float32, device=self.device)
        filled = 0  # positions are sorted and blocks come in order: they fill `out` top to bottom
        for here, block in self.blocks(self.block_rows(budget), positions):
            out[filled:filled + len(here)] = block
            filled += len(here)
        return out

    def fit_scaling(self, positions: np.ndarray, budget: int) -> None:
        """Standardize: the mean and (population) standard deviation of the rows at `positions`,
        accumulated in float64 block by block; a constant column keeps scale 1."""
        if self.scaling != "standardize":
            return
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        squares = torch.zeros_like(total)
        self.mean = self.scale = None
        for _, block in self.blocks(self.block_rows(budget), self.ranks.share(positions), scaled=False):
            total += block.sum(0, dtype=torch.float64)
            squares += (block.double() ** 2).sum(0)
        total, squares = self.ranks.sum(total), self.ranks.sum(squares)
        mean = total / len(positions)
        std = (squares / len(positions) - mean ** 2).clamp_min(0).sqrt()
        std[std < 10 * torch.finfo(torch.float64).eps * mean.abs().clamp_min(1)] = 1.0
        self.mean, self.scale = mean.float(), std.float()

    def scaling_key(self) -> bytes:
        """What the scaled rows depend on besides the rows: the scaling and its fitted values."""
        if self.mean is None:
            return self.scaling.encode()
        return self.scaling.encode() + self.mean.cpu().numpy().tobytes() + self.scale.cpu().numpy().tobytes()

    def _scaled(self, block: torch.Tensor) -> torch.Tensor:
        if self.scaling == "l2":
            return block / block.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.scaling == "standardize":
            if self.mean is None:
                raise RuntimeError("fit_scaling comes before standardized blocks")
            return (block - self.mean) / self.scale
        return block

    def _raw_blocks(self, rows: int, from_row: int = 0) -> Iterator[np.ndarray]:
        """Unscaled rows of `index` in order, from dataset row `from_row` on (the shards before it
        are not read); a combination's parts, each scaled to unit length, side by side (no part
        outweighs another by its size or scale)."""
        if len(self.parts) == 1:
            yield from self._part_rows(self.parts[0], rows, from_row)
            return
        parts = [_exactly(self._part_rows(part, rows, from_row), rows) for part in self.parts]
        for pieces in zip(*parts, strict=True):
            yield np.hstack([p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
                             for p in pieces]).astype(np.float32, copy=False)

    def _part_rows(self, part: str, rows: int, from_row: int) -> Iterator[np.ndarray]:
        for index, block in self.store.iter_blocks(part, rows, from_row):
            keep = np.isin(index, self.index, assume_unique=True) & (index >= from_row)
            if keep.any():
                yield block if keep.all() else block[keep]


def _exactly(blocks: Iterator[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """The same rows in blocks of exactly `rows` (the last one shorter), so that the parts of a
    combination, stored in shards of different sizes, line up."""
    pending: list[np.ndarray] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += len(block)
        while held >= rows:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield joined[:rows]
            rest = joined[rows:]
            pending, held = ([rest] if len(rest) else []), len(rest)
    if held:
        yield np.concatenate(pending)
