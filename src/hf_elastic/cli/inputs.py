"""What the commands read: models (folder or Hub id), data (file, folder or Hub data set), sub-network configs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SUBNETS = ("max", "min", "median")


def load_model_and_tokenizer(args: argparse.Namespace, source: str | None = None) -> tuple[Any, Any]:
    """The model and tokenizer of `source` (default `args.model`): a folder (any hf_elastic export too) or a Hub id;
    for train, search, export and extract also a GPTQ or compressed-tensors INT4/INT8 checkpoint, as `QuantLinear`
    layers (with `--float-model`, with their rounding residual rebuilt)."""

    from ..compression.quantization.hub_loading import hub_checkpoint, load_hub_quantized, rebuild_residual
    from ..export.subnetwork import load_exported
    from ..models.loading import load_causal_lm, load_tokenizer, resolve_dtype
    from ..utils import check_safetensors

    source = source or args.model
    dtype = resolve_dtype(args.dtype)
    hub = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}
    float_model = getattr(args, "float_model", None)
    if Path(source).is_dir():
        if args.revision:
            raise ValueError(f"--revision {args.revision} applies to Hub ids; {source} is a local folder.")
        if not Path(source, "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a model folder (no config.json).")
        for weights in sorted(Path(source).glob("*.safetensors")):
            check_safetensors(weights, "the model folder is damaged: save or download the model again")
    # the commands that take a base for adapters read GPTQ / compressed-tensors checkpoints into QuantLinear
    quantized = hub_checkpoint(source, args.revision) if hasattr(args, "float_model") else None
    if quantized is not None:
        model = load_hub_quantized(quantized, dtype=None if dtype == "auto" else dtype)
        if float_model is not None:
            rebuild_residual(model, float_model, args.float_model_tolerance, option="--float-model")
    elif float_model is not None:
        raise ValueError(
            f"--float-model applies to a GPTQ or compressed-tensors INT4/INT8 base; {source} is not one "
            "(hf_elastic's own INT4 folders keep their residual: hf-elastic quantize --keep-residual)."
        )
    elif Path(source).is_dir():
        model = load_exported(source, dtype=None if dtype == "auto" else dtype)
    else:
        model = load_causal_lm(source, dtype=dtype, **hub)
    device = getattr(args, "device", None)
    if device is not None:
        model.to(resolve_device(device))
    return model, load_tokenizer(source, **hub)


def resolve_device(value: str) -> Any:
    """The torch device `--device` names: `auto` is the GPU when there is one, else the CPU (said in one line on
    stderr); a named accelerator that is not there is an error, never a silent fall back to the CPU."""
    import sys

    import torch

    if value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("note: no CUDA GPU found, running on the CPU (--device cpu hides this line)", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"--device {value!r} is not a device; use auto, cpu, cuda or cuda:<index>.") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = backend is not None and callable(getattr(backend, "is_available", None)) and backend.is_available()
    if not available:
        raise ValueError(
            f"--device {value}: no {device.type.upper()} device is available here (torch {torch.__version__}). "
            "Pass --device cpu to run on the CPU, or --device auto to take the GPU when there is one."
        )
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {value}: this machine has {count} {device.type} device(s), numbered from 0.")
    return device


def instruction_format(args: argparse.Namespace) -> Any:
    from ..data import InstructionFormat

    return InstructionFormat(
        template=args.template,
        response_template=args.response_template,
        completion_only=getattr(args, "completion_only", True),
        text_column=args.text_column,
    )


def read_rows(args: argparse.Namespace, source: str, split: str, limit: int | None, option: str) -> Any:
    from ..data import load_rows

    return load_rows(
        source, config=args.data_config, split=split, revision=args.data_revision, limit=limit, option=option
    )


def calibration_texts(args: argparse.Namespace, tokenizer: Any) -> Iterator[str] | None:
    """The calibration rows as plain texts (prompt and answer joined), produced lazily, or None without
    `--calibration`. Packing reads them only until `--num-samples` windows of `--seq-len` tokens are full."""
    if not args.calibration:
        return None
    rows = read_rows(args, args.calibration, args.split, None, "--calibration")
    fmt = instruction_format(args)
    shape = fmt.shape(rows.column_names)
    return ("".join(text for text, _ in fmt.segments(row, shape, tokenizer)) for row in rows)


def token_dataset(args: argparse.Namespace, rows: Any, tokenizer: Any, model: Any) -> Any:
    from ..compression.calibration import max_positions
    from ..data import tokenize_rows

    fmt = instruction_format(args)
    return tokenize_rows(
        rows, tokenizer, args.seq_len, fmt, packing=getattr(args, "packing", False), max_positions=max_positions(model)
    )


def subnet_config(value: str, select: str = "best") -> Any:
    """`max`/`min`/`median`, a JSON object, a JSON file with a config, or a search result (+ `:best`/`:<index>`)."""
    if value in _SUBNETS:
        return value
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {value!r} is not valid JSON ({err.msg} at column {err.colno}).") from None
    path, _, pick = value.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {value!r} is neither max/min/median, a JSON object nor a file.")
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not a JSON file ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} holds a {type(data).__name__}; expected a JSON object.")
    if "evaluations" not in data:
        return data.get("config", data)
    from ..search.result import SearchResult

    try:
        result = SearchResult.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ValueError(
            f"--config {path} is not a search result written by hf_elastic ({error!r} is wrong)."
        ) from None
    if pick.isdigit():
        index = int(pick)
        count = len(result.evaluations)
        if index >= count:
            raise ValueError(f"--config {value}: {path} has {count} evaluations, numbered 0 to {count - 1}.")
        return result.evaluations[index].config
    if pick not in ("", "best"):
        raise ValueError(f"--config {value}: use {path}, {path}:best or {path}:<index of an evaluation>.")
    try:
        return select_from(result, select).config
    except ValueError as error:
        raise ValueError(f"--config {path}: {error}") from None


def select_from(result: Any, select: str) -> Any:
    """`best` (first objective) or `best_under:<cost>:<fraction of the max sub-network's cost>` of a search result."""
    if select == "best":
        return result.best()
    kind, _, rest = select.partition(":")
    cost, _, fraction = rest.partition(":")
    try:
        limit = float(fraction)
    except ValueError:
        limit = -1.0
    if kind != "best_under" or not cost or not 0 < limit <= 1:
        raise ValueError(
            f"--select {select!r}: use 'best' or 'best_under:<cost>:<fraction>', e.g. 'best_under:params:0.7' "
            f"(objectives of this search: {list(result.objectives)})."
        )
    return result.best_under(result.objectives[0], cost, limit, relative=True)
