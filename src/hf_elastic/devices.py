"""Devices and ranks: where a model lives, waiting for an accelerator, FSDP2 shards, agreement between ranks, and
giving freed host memory back."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on an accelerator has finished (nothing to wait for on CPU), e.g. before reading a
    clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(getattr(torch, device.type, None), "synchronize"):
        getattr(torch, device.type).synchronize()


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor that FSDP2 shards (a DTensor, sharing its storage), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor that FSDP2 shards (a DTensor: an all-gather that every rank must call), or the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def any_rank(flags: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Element-wise OR of the boolean `flags` over all ranks, with one all-reduce on `device` (the backend's device,
    e.g. `TrainingArguments.device`); `flags` as they are without a process group. Every rank must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flags
    votes = flags.to(device or flags.device, torch.int32)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return votes.to(flags.device).bool()


@contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Float32 matmuls on CUDA in full precision inside the block, also where TF32 is enabled (GPTQ's Hessian and
    its inverse lose too much in TF32's 10-bit mantissa). The setting is restored on exit."""
    matmul = torch.backends.cuda.matmul
    try:
        name, full, previous = "allow_tf32", False, matmul.allow_tf32
    except RuntimeError:  # TF32 was set with the fp32_precision API, which the legacy flag refuses to read
        name, full, previous = "fp32_precision", "ieee", matmul.fp32_precision
    if previous in (False, "ieee", "none"):
        yield
        return
    setattr(matmul, name, full)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def module_device(model: Any) -> torch.device:
    """The device of a model's first parameter, else its `device` attribute (optimum-intel models), else the CPU."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device(getattr(model, "device", "cpu"))


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device`: free GPU memory (`torch.cuda.mem_get_info`), or the host's
    available RAM for the CPU; `None` where it cannot be told (other devices)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil  # an accelerate dependency

        return psutil.virtual_memory().available
    return None


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Give the pages of freed buffers back to the OS (glibc's `malloc_trim`; nothing elsewhere). Buffers freed
    between allocations that stay alive otherwise keep counting in the RSS as heap fragments."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
