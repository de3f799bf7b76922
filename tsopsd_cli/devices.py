"""Devices and dtypes by name: the one table of dtype names and how "auto" resolves."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

from tsopsd_cli.errors import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; an explicit cuda device without CUDA is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device} asked for, but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU, float32 on the CPU; otherwise the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


@functools.cache
def _libc_malloc_trim():
    """glibc's malloc_trim, or None (another C library, or not found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_host_memory(device: torch.device) -> None:
    """On the CPU, hand the heap's free pages back to the system (glibc `malloc_trim`). Called after a phase
    frees large tensors (the gathered weights a rollout sampled from, a step's gradients): glibc keeps freed blocks
    under its dynamic mmap threshold (up to 32 MiB: most layer weights) in the heap, where the next phase's other
    sizes cannot always reuse them, so the process's peak would carry them. Costs milliseconds; a no-op on CUDA
    devices and without glibc."""
    if device.type != "cpu":
        return
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)
