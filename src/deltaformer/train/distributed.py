"""Multi-process data parallel under ``torchrun``: process group set-up and a resumable sampler.

``torchrun --nproc_per_node N`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`init_distributed` reads
them and joins the group (gloo on CPU, nccl on GPU). Without them everything runs as one process, and the
same code path is used: the sampler is a :class:`~torch.utils.data.DistributedSampler` with one replica.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the ``torchrun`` process group when launched by it; else a single-process environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world > 1:
        if use_cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    else:
        dev = torch.device(device) if device else torch.device("cuda" if use_cuda else "cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over processes in place (no-op for one process)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start ``skip`` samples into an epoch.

    The epoch's order depends only on ``seed + epoch`` (as in ``DistributedSampler``), so a resumed run
    rebuilds the same permutation and skips the batches it has already trained on.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)
