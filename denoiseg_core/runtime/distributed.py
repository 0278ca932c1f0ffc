"""Data-parallel training with PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc_per_node N $(which denoiseg) train CONFIG`` (or ``python -m
torch.distributed.run ... -m denoiseg_core train CONFIG``) starts N copies of the same
command; torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`setup` reads them and joins the process group: NCCL when the
processes train on CUDA (one GPU each, ``cuda:LOCAL_RANK``), gloo on CPU. Each rank
samples its own patches (its own seed offset) with ``batch_size / world_size`` patches
per step; DDP averages the gradients, so a step equals a single-process step on the full
batch in expectation. Rank 0 alone validates and writes checkpoints, logs and plots.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from denoiseg_core.errors import ConfigError

#: environment variables torchrun sets for every process
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  #: ``gloo`` / ``nccl``; None for a single process
    owns_group: bool = False  #: True if :func:`setup` created the process group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates and writes files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process run (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def setup(device_type: str) -> DistributedContext:
    """Join the process group described by torchrun's variables; a no-op for one process.

    ``device_type`` is where this run trains (``cuda`` -> NCCL, anything else -> gloo).
    An already initialised default group (e.g. set up by the caller) is reused as is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            backend=str(dist.get_backend()),
        )
    if not launched_by_torchrun():
        return DistributedContext()
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; start distributed training with torchrun"
        )
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; cannot train on several processes")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s): "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    # A generous timeout: other ranks wait at a collective while rank 0 validates.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        owns_group=True,
    )


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Patches per step on each rank: ``batch_size / world_size`` (must divide evenly)."""
    if batch_size % world_size:
        raise ConfigError(
            f"training.batch_size {batch_size} is not divisible by the {world_size} processes; "
            "each process trains on batch_size / world_size patches"
        )
    return batch_size // world_size


def all_reduce_mean(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (``tensor`` itself for one process)."""
    if not context.enabled:
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / context.world_size


def broadcast_values(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (e.g. validation losses driving the LR scheduler,
    which must stay identical on all ranks). Other ranks pass a list of the same length."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def teardown(context: DistributedContext) -> None:
    """Leave the process group if :func:`setup` created it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DistributedContext",
    "all_reduce_mean",
    "barrier",
    "broadcast_values",
    "launched_by_torchrun",
    "per_rank_batch",
    "setup",
    "teardown",
]
