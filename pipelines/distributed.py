"""Several processes, one run: data parallelism over torch.distributed.

Launched by `accelerate launch --multi_gpu --num_processes N` on GPUs, or `torchrun --nproc_per_node N` (CPU
processes over gloo, which is how the tests prove it here). Every process computes the same global batch order,
noise and timesteps from the shared seed and trains on its own slice of each global batch; gradients are averaged
across processes before the optimizer step, so N processes with batch b follow the same curve as one process with
batch N*b. Gradients are reduced by hand rather than by wrapping the model in DistributedDataParallel because
methods add parameters while training (LoRA-Over MPOR converts matrices), which DDP cannot follow.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    world: int = 1
    rank: int = 0
    device: str = "cpu"
    """Where collective ops put their tensors (nccl needs them on the GPU)."""

    @property
    def main(self) -> bool:
        """True for the one process that writes files, logs and shows progress."""
        return self.rank == 0

    @classmethod
    def current(cls, device: str) -> Ranks:
        """Join the process group the launcher set up (WORLD_SIZE > 1); a single process otherwise."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=torch.device(device).type == "cpu")  # gloo on CPU, nccl on GPUs
        return cls(state.num_processes, state.process_index, device)

    def local(self, items: Sequence | torch.Tensor, per_process: int):
        """Return this process's slice of a global batch (rank r takes items r*b .. r*b + b - 1)."""
        return items[self.rank * per_process:(self.rank + 1) * per_process]

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of `params` over all processes, in one flat all-reduce."""
        if self.world == 1:
            return
        for p in params:  # a process with an empty slice of the last batch computed no gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def mean(self, value: float) -> float:
        """Return the average of a number over all processes (e.g. the logged loss)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on any process (so all of them stop at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world > 1:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on the main process first, then on the others (e.g. fill a disk cache once)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


SINGLE_PROCESS = Ranks()
