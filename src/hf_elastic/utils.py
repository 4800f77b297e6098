"""Small helpers shared across hf_elastic."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save_file

ELASTIC_CONFIG_NAME = "elastic_config.json"
SUBNET_CONFIG_NAME = "elastic_subnet.json"


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; it replaces `path` (flushed to disk) only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to `path` so that a crash never leaves a half-written file."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """`safetensors.torch.save_file` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """`path` as a Path; raises when it exists and `overwrite` is False (or when it is a file)."""
    path = Path(path)
    if path.exists() and not (overwrite and path.is_dir()):
        raise FileExistsError(f"{str(path)!r} already exists. Pass overwrite=True or choose another folder.")
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, so `path` is complete or untouched."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on an accelerator has finished (nothing to wait for on CPU), e.g. before reading a
    clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(getattr(torch, device.type, None), "synchronize"):
        getattr(torch, device.type).synchronize()


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


def split_layer_key(key: str) -> tuple[str, str]:
    """Split a module key into (layer index, path inside the layer).

    `"model.layers.3.self_attn.q_proj"` gives `("3", "self_attn.q_proj")`; a key outside any numbered layer gives
    `("global", key)`.
    """
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return part, ".".join(parts[i + 1 :]) or key
    return "global", key


def matches_module(path: str, pattern: str) -> bool:
    """peft-style suffix match: `pattern` equals `path` or is a dotted suffix of it."""
    return path == pattern or path.endswith("." + pattern)


def rows_by_name(rows: Iterable[Any], *properties: str) -> dict[str, dict[str, Any]]:
    """Dataclass rows of a report keyed by their `name`, with the given properties added, ready for JSON."""
    return {
        row.name: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(row).items() if k != "name"}
        | {p: getattr(row, p) for p in properties}
        for row in rows
    }
