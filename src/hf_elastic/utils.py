"""Small helpers shared across hf_elastic."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save_file

ELASTIC_CONFIG_NAME = "elastic_config.json"
SUBNET_CONFIG_NAME = "elastic_subnet.json"
QUIET_LOGGERS = ("transformers", "optimum")
"""Loggers whose warnings `quiet_library_output` hides: load notices, deprecations of internals, export notes."""
QUIET_DEPRECATIONS = ("transformers", "optimum", "nncf", "openvino", "peft", "torch")
"""Libraries whose own deprecation notices (raised inside them) `quiet_library_output` hides."""
_VERBOSE: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_elastic_verbose", default=False)
_FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def full_disk_errno(error: BaseException) -> int | None:
    """The errno of a write that failed for lack of space (no space, file too large, quota), else None; also for the
    errors safetensors and torch.save raise in place of an `OSError`."""
    if isinstance(error, OSError):
        return error.errno if error.errno in _FULL_DISK else None
    text = str(error)
    code = re.search(r"os error (\d+)", text)
    if code and int(code.group(1)) in _FULL_DISK:
        return int(code.group(1))
    if isinstance(error, RuntimeError) and "inline_container" in text and "unexpected pos" in text:
        return errno.ENOSPC  # torch.save's zip writer, cut short
    return None


def _newest_file(folder: Path) -> Path | None:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


@contextmanager
def explain_full_disk(target: str | os.PathLike, written: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a write into `written` (a temporary file or folder standing for `target`) that fails for lack of space
    into an `OSError` naming the file and saying whether `target` keeps its previous contents."""
    target = Path(target)
    try:
        yield
    except Exception as error:
        code = full_disk_errno(error)
        if code is None:
            raise
        written = Path(written) if written is not None else target
        file = getattr(error, "file", None) or getattr(error, "filename", None)
        file = Path(file or (written.is_dir() and _newest_file(written)) or target)
        name = file.relative_to(written) if written in file.parents else file.name
        state = f"{target} keeps its previous contents" if target.exists() else f"nothing was written to {target}"
        reason = os.strerror(code) if code != errno.ENOSPC or isinstance(error, OSError) else "the write was cut short"
        full = OSError(
            f"No room to write {name} ({reason}); {state}. Free disk space (or raise the file size limit, "
            "`ulimit -f`) and run again."
        )
        full.errno, full.file = code, file  # not `filename`, which would replace the message in str()
        raise full from None


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; it replaces `path` (flushed to disk) only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with explain_full_disk(path, tmp), os.fdopen(fd, mode, **kwargs) as f:
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


# safetensors' tensor order in a file: by dtype, in this order, then by name
_SAFETENSORS_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64", torch.float32: "F32",
    torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16",
    torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}
_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], filename: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file` that writes one tensor at a time: the same file (metadata keys aside, whose order
    safetensors does not fix) without first copying every tensor into one serialized buffer; a tensor off the CPU or
    not contiguous is copied alone, while it is written."""
    if sys.byteorder == "big" or any(t.dtype not in _DTYPE_RANK for t in tensors.values()):
        save_file(dict(tensors), filename, metadata=metadata)
        return
    names = sorted(tensors, key=lambda name: (_DTYPE_RANK[tensors[name].dtype], name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.layout != torch.strided:
            raise ValueError(f"{name} is a sparse tensor; safetensors holds dense tensors only (call .to_dense()).")
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape)}
        header[name] = entry | {"data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            tensor = tensors[name].detach()
            if tensor.numel():
                f.write(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


class SafetensorsReader:
    """The tensors of a safetensors file, each read with plain file reads when asked for (the header once): unlike the
    memory map of `safetensors`, whose pages stay resident until the whole file is let go, a tensor's memory is freed
    when the tensor is dropped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self._entries, self._data_start = header, 8 + length

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            data = bytearray(f.read(end - begin))
        dtype = _TORCH_DTYPES[entry["dtype"]]
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(entry["shape"])


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """`write_safetensors` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with explain_full_disk(path, tmp):
            write_safetensors(tensors, tmp, metadata={"format": "pt"} | (metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, fix: str = "write it again") -> dict[str, Any]:
    """A JSON object from `path`, or an error that names the file, what is wrong and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {fix}.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}.")
    return data


def load_safetensors(path: str | os.PathLike, fix: str = "save it again") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a safetensors file, or an error naming the file when it is missing or damaged."""
    from safetensors.torch import load_file

    metadata = check_safetensors(path, fix)
    try:
        return load_file(path), metadata
    except Exception as err:
        raise _damaged(Path(path), err, fix) from None


def check_safetensors(path: str | os.PathLike, fix: str = "save it again") -> dict[str, str]:
    """The metadata of a safetensors file after reading its header only, or an error naming the file when it is
    missing or damaged (random bytes, cut short)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {fix}.")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as err:
        raise _damaged(path, err, fix) from None


def _damaged(path: Path, err: Exception, fix: str) -> ValueError:
    return ValueError(f"{path} ({path.stat().st_size} bytes) is not a readable safetensors file ({err}); {fix}.")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def digest(value: Any) -> str:
    """A short SHA-256 of `value` as canonical JSON, to bind files of one save together."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stale_copies(path: Path, suffix: str) -> list[tuple[Path, int | None]]:
    """Hidden `.{name}.[pid.]xxxx.{suffix}` folders that `atomic_directory` left beside `path`, with their pid."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[^.]+\.{suffix}$")
    found = []
    for entry in path.parent.glob(f".{path.name}.*.{suffix}") if path.parent.is_dir() else ():
        match = pattern.match(entry.name)
        if match and entry.is_dir():
            found.append((entry, int(match.group(1)) if match.group(1) else None))
    return sorted(found, key=lambda item: item[0].stat().st_mtime)


def _alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_directory(path: str | os.PathLike) -> None:
    """Finish what a killed `atomic_directory` left: restore `path` from its moved-away copy, drop stale temp folders.

    A process killed between moving the old folder away and moving the new one in leaves `path` missing and the old
    copy in `.{name}.<pid>.xxxx.old/`; it is moved back. Temporary folders of processes that no longer run are removed.
    """
    path = Path(path)
    for old, _ in reversed(_stale_copies(path, "old")):
        inner = old / path.name
        if not path.exists() and inner.is_dir():
            os.replace(inner, path)
            warnings.warn(f"Restored {path} from {old.name}: an earlier overwrite was interrupted.", stacklevel=3)
        else:
            warnings.warn(f"Removed {old}, the old copy an interrupted overwrite of {path} left.", stacklevel=3)
        shutil.rmtree(old, ignore_errors=True)
    for tmp, pid in _stale_copies(path, "tmp"):
        if not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"Removed {tmp}, the unfinished output of an interrupted run.", stacklevel=3)


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """`path` as a Path, after `recover_directory`; raises when it exists and `overwrite` is False (or is a file)."""
    path = Path(path)
    recover_directory(path)
    if path.exists() and not (overwrite and path.is_dir()):
        raise FileExistsError(f"{str(path)!r} already exists. Pass overwrite=True or choose another folder.")
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, so `path` is complete or untouched.

    A run killed at any point leaves either the old or the new folder at `path` (or, between the two renames, the
    old one in a hidden `.old` folder); the next `atomic_directory` or `check_output_dir` call on `path` restores it.
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    try:
        with explain_full_disk(path, tmp):
            yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=path.parent))
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


def staging_folder(path: str | os.PathLike) -> Path:
    """The hidden folder beside `path` where `commit_files` expects the files of the next save."""
    path = Path(path)
    return path.parent / f".{path.name}.saving"


def _fsync_tree(folder: Path) -> None:
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def commit_files(path: str | os.PathLike, last: str = ELASTIC_CONFIG_NAME) -> None:
    """Move the files written to `staging_folder(path)` into `path` as one save; other files of `path` stay.

    A new `path` is the staging folder renamed (complete or absent). Into an existing folder, the staging folder is
    first renamed to `.{name}.commit` (the commit point: before it the old files are untouched, after it the new ones
    win) and its files are then moved in one by one, `last` last; a run killed in between is finished by
    `recover_files`, which `load_super_network` and the next save call.
    """
    path = Path(path)
    staging = staging_folder(path)
    _fsync_tree(staging)
    if not path.exists():
        os.replace(staging, path)
        return
    commit = path.parent / f".{path.name}.commit"
    os.replace(staging, commit)
    _move_in(commit, path, last)


def _move_in(commit: Path, path: Path, last: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(commit), key=lambda n: n == last):
        if (path / name).is_dir() and not (path / name).is_symlink():
            shutil.rmtree(path / name)
        with contextlib.suppress(FileNotFoundError):  # moved by a concurrent recover_files
            os.replace(commit / name, path / name)
    shutil.rmtree(commit, ignore_errors=True)


def recover_files(path: str | os.PathLike, last: str = ELASTIC_CONFIG_NAME) -> None:
    """Finish a `commit_files` that was killed after its commit point, so `path` holds the whole new save.

    Staged files of a save killed before its commit point are left for that writer's next save to remove: `path`
    still holds the old files, untouched.
    """
    path = Path(path)
    commit = path.parent / f".{path.name}.commit"
    if commit.is_dir():
        _move_in(commit, path, last)
        warnings.warn(f"Finished the interrupted save of {path} (its new files were complete).", stacklevel=3)


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


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths are the same folder or one lies inside the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


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


def typed_fields(owner: str | None = None) -> Callable:
    """Decorate a config's `__post_init__` so that a field holding a value of another type than its annotation
    raises a `ValueError` naming it (`check_field_types`): after the checks of `__post_init__`, whose messages are
    more specific, and in place of the raw `TypeError` they may meet first. `owner` names the base class whose
    fields are checked (a mixin), default as in `check_field_types`."""

    def decorate(post_init: Callable) -> Callable:
        @functools.wraps(post_init)
        def run(self: Any) -> None:
            cls = next(c for c in type(self).__mro__ if c.__name__ == owner) if owner else None
            try:
                post_init(self)
            except (TypeError, AttributeError, KeyError, IndexError):
                check_field_types(self, cls)
                raise
            check_field_types(self, cls)

        return run

    return decorate


def check_field_types(config: Any, owner: type | None = None) -> None:
    """Raise a `ValueError` naming the first field of `config` whose value does not have its annotated type (a bool
    is no int, an int is a float, a tuple is a list). The fields are those of `owner` (a dataclass among its bases),
    else the `elastic_fields` of a peft config, else all."""
    import dataclasses
    import typing

    cls = owner or type(config)
    hints = typing.get_type_hints(cls)
    annotations = {f.name: f.type for f in dataclasses.fields(cls)}
    names = annotations if owner is not None else getattr(config, "elastic_fields", annotations)
    for name in names:
        value = getattr(config, name)
        if name in hints and not _has_type(value, hints[name]):
            wanted = annotations[name] if isinstance(annotations[name], str) else hints[name]
            raise ValueError(f"{type(config).__name__}.{name}={value!r} must be of type {wanted}.")


def _has_type(value: Any, hint: Any) -> bool:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_has_type(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (
            not args or all(_has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items())
        )
    return isinstance(value, origin or hint) if isinstance(origin or hint, type) else True


def config_from_kwargs(cls: type, config: Any, kwargs: dict[str, Any], caller: str) -> Any:
    """A copy of `config` (an instance of the dataclass `cls`), or `cls(**kwargs)` when only keyword arguments are
    given: the two forms `caller(..., config)` and `caller(..., field=value)` of a function that takes a config."""
    from dataclasses import fields, replace

    if config is not None and not isinstance(config, cls):
        raise TypeError(f"{caller}() takes a {cls.__name__} as config, got {type(config).__name__}: {config!r}.")
    if config is not None and kwargs:
        raise ValueError(
            f"{caller}() got a {cls.__name__} and the keyword arguments {sorted(kwargs)}: set them on the config, "
            f"e.g. dataclasses.replace(config, {next(iter(kwargs))}=...), or pass keyword arguments only."
        )
    if config is not None:
        return replace(config)  # the caller's object stays as it was
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{caller}() got unknown arguments {unknown}; {cls.__name__} has the fields {sorted(known)}.")
    return cls(**kwargs)


@contextmanager
def quiet_library_output(verbose: bool | None = None) -> Iterator[None]:
    """Hide what the libraries below hf_elastic print that a user of the CLI or the demo cannot act on.

    Inside the block: torch.jit `TracerWarning`s (OpenVINO export traces the model) and deprecation warnings raised
    inside `QUIET_DEPRECATIONS` are ignored; the `QUIET_LOGGERS` show errors only and NNCF's logger no INFO (its
    compression tables); transformers', datasets' and NNCF's progress bars are off. hf_elastic's own warnings and
    progress and every error still show; everything is restored on exit. Only the entry points (`hf-elastic`,
    `run_demo`) use it; library functions never filter warnings.

    Args:
        verbose: show everything. `None` keeps the choice of an enclosing block (quiet when there is none), so the
            CLI's `--verbose` also reaches the demo it runs.
    """
    verbose = _VERBOSE.get() if verbose is None else verbose
    token = _VERBOSE.set(verbose)
    try:
        if verbose:
            yield
            return
        with warnings.catch_warnings(), _quiet_loggers(), _no_progress_bars():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            for library in QUIET_DEPRECATIONS:
                for category in (DeprecationWarning, FutureWarning):
                    warnings.filterwarnings("ignore", category=category, module=rf"{library}(\.|$)")
            yield
    finally:
        _VERBOSE.reset(token)


@contextmanager
def _quiet_loggers() -> Iterator[None]:
    import transformers.utils.logging as transformers_logging

    transformers_logging.get_verbosity()  # sets up its logger now, so that doing so later does not reset the level
    levels = dict.fromkeys(QUIET_LOGGERS, logging.ERROR)
    if importlib.util.find_spec("nncf") is not None:
        # imported first: its import sets its logger to INFO, and a logger made before it would lack NNCF's methods
        import nncf.common.logging.logger  # noqa: F401

        levels["nncf"] = logging.WARNING  # its compression tables are INFO
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    before = {logger: logger.level for logger in loggers}
    try:
        for logger, level in loggers.items():
            logger.setLevel(max(level, logger.getEffectiveLevel()))
        yield
    finally:
        for logger, level in before.items():
            logger.setLevel(level)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' and datasets' tqdm bars and NNCF's rich progress display (on rich's global console) off."""
    import datasets.utils as datasets_utils
    import transformers.utils.logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled(), not datasets_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    datasets_utils.disable_progress_bars()
    try:
        import rich
    except ImportError:  # NNCF is not installed
        console = None
    else:
        console = rich.get_console()
        was_quiet, console.quiet = console.quiet, True
    try:
        yield
    finally:
        if shown[0]:
            transformers_logging.enable_progress_bar()
        if shown[1]:
            datasets_utils.enable_progress_bars()
        if console is not None:
            console.quiet = was_quiet


def warn_renamed(old: str, new: str, why: str = "", stacklevel: int = 3) -> None:
    """The `FutureWarning` of a public name that was renamed: the old one still works until a later release."""
    warnings.warn(
        f"`{old}` is now `{new}`{f' ({why})' if why else ''}. The old name will be removed in a later release.",
        FutureWarning,
        stacklevel=stacklevel,
    )
