"""Where and how a model runs: the device (``"auto"``: CUDA when present), the autocast precision
of ``--amp``, and the process group that ``torchrun`` sets up for data-parallel runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from densenet.choices import AMP_MODES
from densenet.errors import DenseNetError
from densenet.infer.precision import bfloat16_support, compute_dtype, resolve_dtype

__all__ = [
    "AMP_MODES",
    "Ranks",
    "amp_dtype",
    "compute_dtype",
    "distributed_setup",
    "process_group",
    "resolve_device",
    "resolve_dtype",
    "torchrun_ranks",
]


class Ranks(NamedTuple):
    """This process's place among those ``torchrun`` started: ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` (its index on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def torchrun_ranks() -> Ranks:
    """The ranks ``torchrun`` put in this process's environment, ``Ranks()`` outside torchrun;
    the one place the package reads them."""
    env = os.environ
    return Ranks(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU. ``"cuda"`` without a GPU is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise DenseNetError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DenseNetError(
            "device 'cuda' was asked for but no CUDA GPU is available; use --device cpu"
        )
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that ``amp`` (``AMP_MODES``) means on ``device``; None for float32."""
    if amp == "auto":
        cuda = device.type == "cuda" and bfloat16_support(device) == "native"
        return torch.bfloat16 if cuda else None
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def distributed_setup(device: str = "auto") -> tuple[int, int, torch.device | None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) join the default process group (NCCL on GPUs,
    gloo on CPU) and return ``(rank, world_size, this process's device)``; else ``(0, 1, None)``."""
    if torchrun_ranks().world_size <= 1:
        return 0, 1, None
    import torch.distributed as dist

    target = local_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), target


def local_device(device: str = "auto", rank: int | None = None) -> torch.device:
    """``resolve_device(device)``, where a CUDA device without an index becomes this process's
    own GPU (made the current one): under ``torchrun`` (``WORLD_SIZE`` > 1) ``LOCAL_RANK``'s, else
    for a process given its ``rank`` among several on one machine, GPU ``rank % device_count``."""
    target = resolve_device(device)
    if target.type != "cuda" or target.index is not None:
        return target
    ranks = torchrun_ranks()
    if ranks.world_size > 1:
        index = ranks.local_rank
    elif rank is not None:
        index = rank % torch.cuda.device_count()
    else:
        return target
    target = torch.device("cuda", index)
    torch.cuda.set_device(target)
    return target


@contextmanager
def process_group(device: str = "auto") -> Iterator[tuple[int, int, torch.device]]:
    """``(rank, world_size, device)`` for the duration of a ``with`` block: under ``torchrun``
    the process group is joined (and left at the end if the block joined it) and the device is
    this process's; otherwise ``(0, 1, resolve_device(device))``."""
    import torch.distributed as dist

    joined = dist.is_available() and not dist.is_initialized()
    try:
        rank, world_size, local = distributed_setup(device)
        yield rank, world_size, local if local is not None else resolve_device(device)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
