"""Which process this is and where it runs: torchrun's environment, the training device, the process group.

`python train.py` is one process (rank 0 of 1); `torchrun --nproc_per_node N train.py` starts N, and sets
RANK / WORLD_SIZE / LOCAL_RANK for each. train.py's DistributedDataParallel wrapping, gradient syncs and
all-reduces stay in train.py, where the loop they belong to is read.
"""

from __future__ import annotations

import os

import torch

from midistral.errors import ConfigError


def is_master() -> bool:
    """Whether this process is rank 0 (always, without torchrun): rank 0 prepares the data, logs and saves."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) for train.device = `device_name` ("auto": this process's CUDA device, else
    the CPU); joins the process group (NCCL on CUDA, gloo on CPU) when there is more than one process."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if device_name == "auto":
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    else:
        device = torch.device(device_name)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"train.device={device_name!r}: no such CUDA device here "
                              f"({torch.cuda.device_count()} found; use 'cpu' or 'auto')")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device
