"""Several processes on one extraction, with torch.distributed as the engine.

Under `torchrun` (one machine, or many under Slurm with torchrun's rendezvous) each process is a
rank: it takes whole shards (of each layer's shards still to write, every world-th from its
rank on), extracts the images they cover and writes them into the one cache. The manifest is
changed only under its file lock. Rank 0 holds the cache's extraction lock, syncs the image
list and plans the layers before the others start, and prints the one progress line, counting
every rank's images through the rendezvous store. A shard is a shard, so a rerun with another
number of ranks resumes.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

_RUNS = itertools.count()  # every rank runs the same extractions in the same order


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks torchrun describes in the environment; one rank without it."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def device(self, device: str) -> str:
        """Each rank on its own GPU: `auto` or `cuda` becomes cuda:LOCAL_RANK where CUDA is."""
        if self.several and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def join(self, device: torch.device) -> None:
        """Join the process group (NCCL between GPUs, gloo between CPUs), once per process."""
        if self.several and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(hours=2))

    def wait_for_all(self) -> None:
        if self.several:
            dist.barrier()

    def mine(self, shards: list[int]) -> list[int]:
        """This rank's share of the shards still to write: every world-th, from its rank on (the
        same list on every rank, so each shard has one rank)."""
        return shards[self.rank::self.world]

    def counter_key(self) -> str:
        """The name of the next extraction's image count in the rendezvous store."""
        return f"featx/images-done/{next(_RUNS)}"

    def count_done(self, key: str, images: int) -> int:
        """Add this rank's newly extracted images to the run's count; the count of every rank."""
        return int(dist.distributed_c10d._get_default_store().add(key, images))

    def total(self, value: int) -> int:
        """The sum of a number over every rank (all ranks call it)."""
        if not self.several:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor)
        return int(tensor.item())

    def part(self, n: int) -> slice:
        """This rank's contiguous part of n things in order (the parts differ in size by at most one)."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    def share(self, positions: np.ndarray) -> np.ndarray:
        """This rank's part of `positions` (rows a pass over the layer reads)."""
        return positions[self.part(len(positions))]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over every rank (all ranks call it), on the tensor's device."""
        if not self.several:
            return tensor
        work = _for_backend(tensor)
        dist.all_reduce(work)
        return work.to(tensor.device)

    def from_lead(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (all ranks call it, with tensors of the same shape)."""
        if not self.several:
            return tensor
        work = _for_backend(tensor)
        dist.broadcast(work, 0)
        return work.to(tensor.device)

    def joined(self, part: np.ndarray) -> np.ndarray:
        """Every rank's part, in rank order (all ranks call it): the whole of what `share` split."""
        if not self.several:
            return part
        parts: list = [None] * self.world
        dist.all_gather_object(parts, part)
        return np.concatenate(parts)

    def leave(self, together: bool = True) -> None:
        """Leave the process group, if this process joined one: `together`, once every rank is
        here (none leaves while another still talks to it), else at once (a rank that failed).
        A process that ends without leaving may abort at exit, its group's threads still running."""
        if self.several and dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def _for_backend(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor where the process group's backend takes it (NCCL: on the GPU), contiguous."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.cuda()
    return tensor.contiguous()


ALONE = Ranks()  # a run of one process


def launch_local(args: list[str], processes: int) -> int:
    """Run `featx ARGS` as `processes` ranks on this machine through torchrun (standalone
    rendezvous); the exit status of the run."""
    from torch.distributed.run import get_args_parser, run

    options = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(processes), "--module", "featx", *args])
    try:
        run(options)
    except Exception as exc:  # noqa: BLE001 - torchrun's ChildFailedError: the ranks said why
        print(f"featx: error: a rank failed ({type(exc).__name__}); completed shards are kept, "
              "run the same command again to finish", file=sys.stderr)
        return 1
    return 0
