# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""scripts.distributed: each process's share of the cases and the case checks, in a real 2-process gloo group."""

from __future__ import annotations

import os
import socket

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scripts.distributed import (
    PartitionedCacheDataset,
    check_cases_per_process,
    close_process_group,
    init_process_group,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    init_process_group(torch.device("cpu"))
    try:
        assert (idist.get_world_size(), idist.get_rank()) == (2, rank)  # ignite's context is built
        share = PartitionedCacheDataset(list(range(5)), transform=None, progress=False)
        try:
            check_cases_per_process({"validation": ["one case"]})
            error = ""
        except ValueError as e:
            error = str(e)
        results[rank] = {"share": [share[i] for i in range(len(share))], "error": error}
    finally:
        close_process_group()  # waits for the other process, then leaves the group
    results[f"closed {rank}"] = not dist.is_initialized()


@pytest.mark.slow
def test_each_process_caches_its_own_equally_long_share_and_too_few_cases_are_named():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert results[0]["share"] == [0, 2, 4]
    assert results[1]["share"] == [1, 3, 0]  # evened out by repeating the first case
    for rank in (0, 1):
        assert results[rank]["error"].startswith("the validation split has 1 case(s) for 2 processes")
        assert results[f"closed {rank}"]  # both left the group


def test_outside_a_process_group_the_dataset_holds_every_case():
    assert not dist.is_initialized()
    dataset = PartitionedCacheDataset(list(range(3)), transform=None, progress=False)
    assert [dataset[i] for i in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="the training split has 0 case"):
        PartitionedCacheDataset([], transform=None)


def test_closing_outside_a_process_group_does_nothing():
    close_process_group()
    assert not dist.is_initialized()
