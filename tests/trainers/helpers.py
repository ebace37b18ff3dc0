"""Multi-process tests: each rank is a spawned process in a gloo group on the loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    torch.set_num_threads(1)  # several ranks share a few cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any) -> None:
    """Run fn(rank, world_size, *args) on world_size gloo ranks; a failing rank fails the test.

    Ranks are forked: they inherit the imported torch / transformers / megatron (seconds per process
    otherwise). Each runs torch single-threaded, which also keeps OpenMP safe after the fork."""
    mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True, start_method="fork"
    )


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
