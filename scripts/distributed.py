# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""One process per GPU (``torchrun``): the process group, each process's share of the cases, and its checks.

Used by the ``configs/multi_gpu_*.json`` overrides. Every process joins the group with
:func:`init_process_group` and leaves it with :func:`close_process_group`; each training process caches and trains
on its own share of the training cases (:class:`PartitionedCacheDataset`), so the volumes, and with ``soft_labels``
``cached`` the teacher's soft labels, are loaded and computed once per share instead of once per process; validation
and evaluation cases are spread by MONAI's ``DistributedSampler`` after :func:`check_cases_per_process` has made
sure every process gets one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from monai.data import CacheDataset, partition_dataset

__all__ = ["PartitionedCacheDataset", "check_cases_per_process", "close_process_group", "init_process_group"]


def init_process_group(device: torch.device) -> None:
    """Join the ``torchrun`` process group (nccl on CUDA, gloo on CPU) and build ignite's view of it, on every process.

    ignite creates its distributed context lazily, at a process's first ``ignite.distributed`` call, and creating it
    is itself a collective (a new gloo group and an all-reduce). Handlers built on rank 0 only (checkpoint savers,
    loggers: ``_disabled_`` elsewhere) make that first call on rank 0 alone, during the first epoch: rank 0 then waits
    in that collective while the other processes wait in ``DistributedDataParallel``'s next synchronisation, and the
    run hangs. Building the context here, on every process at the same point, makes every later call local.

    Args:
        device: this process's device (``cuda:<LOCAL_RANK>`` or ``cpu``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    idist.sync()


def close_process_group() -> None:
    """Leave the process group once every process is done (the configs' ``finalize``); nothing outside one.

    The barrier comes first: a process that destroys the group while another is still saving its checkpoints makes
    that one abort at exit (``terminate called without an active exception``, seen with 2 gloo processes).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _world() -> tuple[int, int]:
    """(number of processes, this process's rank); (1, 0) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def check_cases_per_process(splits: Mapping[str, Sized]) -> None:
    """Check that every process gets at least one case of every split.

    Args:
        splits: split name (``training``, ``validation``, an ``eval_split``...) -> its cases.

    Raises:
        ValueError: naming the split, its number of cases and the number of processes, if a split has fewer cases
            than there are processes.
    """
    world_size, _ = _world()
    for split, cases in splits.items():
        if len(cases) < world_size:
            raise ValueError(
                f"the {split} split has {len(cases)} case(s) for {world_size} processes: every process needs at least "
                f"one {split} case; use at least {world_size} {split} cases (--datalist, --val_fraction) or run "
                f"fewer processes (torchrun --nproc_per_node {max(len(cases), 1)})."
            )


class PartitionedCacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` holding only this process's share of the cases, for one training process per GPU.

    The cases are split into one share per process with MONAI's ``partition_dataset`` (every ``world_size``-th case
    from the process's rank; the shares are made equally long by repeating cases from the start, so that every
    ``DistributedDataParallel`` process runs the same number of iterations). Each process loads, caches and trains
    on its share only (the data loader shuffles within it): memory and preprocessing, including the teacher's cached
    soft labels (``scripts.soft_labels.TeacherSoftLabelsd``), are divided among the processes instead of repeated
    by each. A case repeated to even out the shares may be computed by two processes; each writes its soft-label
    file atomically, so no process ever reads a half-written one. Outside a process group it is a plain
    ``CacheDataset`` of every case.

    Args:
        data: every case of the split.
        transform: the split's transforms, as ``CacheDataset``'s.
        split: the split's name, for error messages.
        kwargs: the other arguments of ``CacheDataset`` (``cache_rate``, ``num_workers``, ``copy_cache``...).

    Raises:
        ValueError: if there are fewer cases than processes (see :func:`check_cases_per_process`).
    """

    def __init__(
        self, data: Sequence, transform: Sequence[Callable] | Callable, split: str = "training", **kwargs: Any
    ) -> None:
        check_cases_per_process({split: data})
        world_size, rank = _world()
        share = partition_dataset(list(data), num_partitions=world_size, even_divisible=True)[rank]
        super().__init__(data=share, transform=transform, **kwargs)
