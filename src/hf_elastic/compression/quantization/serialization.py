"""`save_quantized` / `load_quantized`: the on-disk form of a quantized model, bit for bit."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...devices import trim_heap
from ...models.loading import build_from_config, load_config, mark_hf_elastic_only
from ...utils import (
    SafetensorsReader,
    atomic_directory,
    atomic_save_safetensors,
    atomic_write_json,
    check_safetensors,
    digest,
    load_safetensors,
    read_json,
)
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GRID_TENSORS,
    QUANT_CONFIG_NAME,
    QUANT_WEIGHTS_NAME,
    QuantLinear,
    dequantize_codes,
)
from .quantize import QuantizationConfig, _replace


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


_DTYPES = ("float32", "float16", "bfloat16")
_FIX = "save the model again with save_quantized"


def save_quantized(
    model: nn.Module, save_directory: str | Path, *, tokenizer: Any = None, overwrite: bool = True
) -> Path:
    """Write a model quantized by `quantize` to `save_directory`: config.json, model.safetensors and
    quantization_config.json (and the tokenizer, if given).

    The folder is written beside the destination and swapped in whole, so it holds the old save or the new one, never
    a mix, even when the process dies; its files share a save id that `load_quantized` checks. An existing folder is
    replaced unless `overwrite=False`. Returns the directory. Stock transformers cannot read the format, so
    `config.json` is marked (`mark_hf_elastic_only`): a stock `from_pretrained` raises an error that names
    `hf_elastic.load_exported` instead of loading random weights.
    """
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("save_quantized found no QuantLinear in the model. Call quantize(model, ...) first.")
    with atomic_directory(save_directory, overwrite) as tmp:
        write_quantized(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(save_directory)


def write_quantized(model: nn.Module, directory: Path) -> None:
    """The files of `save_quantized`, written into an existing (temporary) folder."""
    from ...version import __version__

    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ValueError("save_quantized found no QuantLinear in the model. Call quantize(model, ...) first.")
    state = model.state_dict()
    tensors, tied, seen = {}, {}, {}
    for key, tensor in state.items():
        ref = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if ref in seen:
            tied[key] = seen[ref]
        else:
            seen[ref] = key
            tensors[key] = tensor
    config = getattr(model, "hf_elastic_quantization", None)
    first = next(iter(quant.values()))
    save_id = uuid.uuid4().hex
    quant_config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "hf_elastic_version": __version__,
        "method": config.method if config is not None else None,
        "bits": config.bits if config is not None else first.bits,
        "group_size": config.group_size if config is not None else first.group_size,
        "symmetric": config.symmetric if config is not None else first.symmetric,
        "settings": config.to_dict() if config is not None else None,
        "model_class": type(model).__name__,
        "dtype": str(_model_dtype(model)).removeprefix("torch."),
        "tied": tied,
        "save_id": save_id,
        "modules": {
            name: {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bits": m.bits,
                "group_size": m.group_size,
                "symmetric": m.symmetric,
                "bias": m.bias is not None,
                "residual": m.residual is not None,
            }
            for name, m in quant.items()
        },
    }
    binding = {"hf_elastic_save_id": save_id, "hf_elastic_modules": digest(quant_config["modules"])}
    atomic_save_safetensors(tensors, directory / QUANT_WEIGHTS_NAME, binding)
    model_config = json.loads(model.config.to_json_string(use_diff=True))
    model_config["architectures"] = [type(model).__name__]
    bits = sorted({m.bits for m in quant.values()})
    reason = f"INT{'/INT'.join(map(str, bits))} format"
    atomic_write_json(directory / "config.json", mark_hf_elastic_only(model_config, reason))
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(model, "can_generate") and model.can_generate():
        atomic_write_json(directory / "generation_config.json", generation.to_diff_dict())
    atomic_write_json(directory / QUANT_CONFIG_NAME, quant_config)


def _tie(model: nn.Module, alias: str, source: str) -> None:
    """Make `alias` the same parameter (or buffer) object as `source`, as it was when saved."""
    owner, _, attr = alias.rpartition(".")
    src_owner, _, src_attr = source.rpartition(".")
    setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(src_owner), src_attr))


def _read_folder(directory: Path, model_class: type[nn.Module] | None) -> tuple[dict, type[nn.Module], Any, Path]:
    """The checked quantization config, model class, model config and weights file of a `save_quantized` folder
    (headers only: no weight is read)."""
    import transformers

    directory = Path(directory)
    qc_path = directory / QUANT_CONFIG_NAME
    if not qc_path.is_file():
        raise FileNotFoundError(
            f"No {QUANT_CONFIG_NAME} in {directory}: it was not written by save_quantized. Load an unquantized model "
            "with from_pretrained instead."
        )
    qc = read_json(qc_path, _FIX)
    version = qc.get("format_version")
    if qc.get("format") != FORMAT_NAME or not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(
            f"{qc_path} has format={qc.get('format')!r}, format_version={version!r}; this hf_elastic reads "
            f"{FORMAT_NAME!r} with an integer version up to {FORMAT_VERSION}: {_FIX}."
        )
    if version > FORMAT_VERSION:
        raise ValueError(f"{qc_path} has format_version={version}; this hf_elastic reads up to {FORMAT_VERSION}. "
                         "Upgrade hf_elastic.")  # fmt: skip
    if not isinstance(qc.get("modules"), dict) or not qc["modules"]:
        raise ValueError(f"{qc_path} lists no quantized 'modules'; {_FIX}.")
    if qc.get("dtype") not in _DTYPES:
        raise ValueError(f"{qc_path} has dtype={qc.get('dtype')!r}; expected one of {list(_DTYPES)}: {_FIX}.")
    if not isinstance(qc.get("model_class"), str) or not isinstance(qc.get("tied", {}), dict):
        raise ValueError(f"{qc_path} lacks a 'model_class' name or has a malformed 'tied' map; {_FIX}.")
    if model_class is None:
        model_class = getattr(transformers, qc["model_class"], None)
        if model_class is None:
            raise ValueError(
                f"{qc_path} names model_class={qc['model_class']!r}, which transformers does not have. Pass "
                "model_class=<the model's class> to load_quantized."
            )
    config = load_config(directory)
    weights = directory / QUANT_WEIGHTS_NAME
    metadata = check_safetensors(weights, _FIX)
    saved_id = metadata.get("hf_elastic_save_id")
    if saved_id is not None and qc.get("save_id") not in (None, saved_id):
        raise ValueError(
            f"{weights} and {QUANT_CONFIG_NAME} come from different saves (save ids {saved_id} and {qc['save_id']}), "
            f"e.g. after an interrupted overwrite; {_FIX}."
        )
    if metadata.get("hf_elastic_modules", digest(qc["modules"])) != digest(qc["modules"]):
        raise ValueError(
            f"The module settings in {qc_path} (bits, group size, shapes) differ from those saved with "
            f"{QUANT_WEIGHTS_NAME}: the file was edited after saving. Restore it or {_FIX}."
        )
    return qc, model_class, config, weights


def load_quantized(
    directory: str | Path, model_class: type[nn.Module] | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Rebuild a model written by `save_quantized`: from its config, with `QuantLinear` modules, bit for bit.

    `model_class` defaults to the transformers class named in `quantization_config.json`.
    """
    directory = Path(directory)
    qc, model_class, config, weights = _read_folder(directory, model_class)
    qc_path, dtype = directory / QUANT_CONFIG_NAME, getattr(torch, qc["dtype"])
    # Built without initialization (its float weights are never written, so they take no memory) and filled by
    # `assign`: each weight is held once, as read from the file, whatever the model's size.
    model = build_from_config(model_class, directory, config, dtype)
    tensors, _ = load_safetensors(weights, _FIX)
    for name, spec in qc["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{qc_path} lists module {name!r}, which {model_class.__name__} does not have.") from None
        new = QuantLinear(
            spec["in_features"],
            spec["out_features"],
            spec["bits"],
            spec["group_size"],
            spec["symmetric"],
            spec["bias"],
            device="meta",
            dtype=dtype,
        )
        if spec.get("residual", False):
            new.residual = torch.zeros_like(new.qweight, dtype=torch.int8)
        for buffer in GRID_TENSORS + (("residual",) if new.residual is not None else ()):
            key, expected = f"{name}.{buffer}", getattr(new, buffer)
            if key not in tensors:
                raise ValueError(f"{weights} has no {key!r}; the file is incomplete.")
            saved = tensors[key]
            if saved.shape != expected.shape or saved.dtype != expected.dtype:
                raise ValueError(
                    f"{key} in {QUANT_WEIGHTS_NAME} is {saved.dtype} {tuple(saved.shape)}, but {QUANT_CONFIG_NAME} "
                    f"(in_features={spec['in_features']}, out_features={spec['out_features']}, "
                    f"group_size={spec['group_size']}) needs {expected.dtype} {tuple(expected.shape)}. The two files "
                    "do not belong together: save the model again with save_quantized."
                )
        _replace(model, name, new)
    tied = qc.get("tied", {})
    expected_keys = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected_keys)
    untied = sorted(k for k in expected_keys - set(tensors) if tied.get(k) not in tensors)
    if untied or unexpected:
        raise ValueError(
            f"{weights} does not match {model_class.__name__}: missing {untied}, unexpected {unexpected}."
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    for alias, source in tied.items():
        if alias in expected_keys:
            _tie(model, alias, source)
    for name in qc["modules"]:
        module = model.get_submodule(name)
        if int(module.qweight.max()) > 2**module.bits - 1:
            raise ValueError(f"{name}.qweight holds codes above {2**module.bits - 1} for bits={module.bits}.")
    settings = qc.get("settings")
    if settings is not None:
        try:
            model.hf_elastic_quantization = QuantizationConfig(**settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{qc_path} has damaged 'settings' ({error}); save the model again.") from None
    if device is not None:
        model.to(device)
    return model.eval()


def load_dequantized(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a `save_quantized` folder in `dtype`, with `nn.Linear` layers holding the dequantized weights in
    place of the `QuantLinear` ones: what an export that writes the codes again traces.

    The file is read one tensor at a time with plain reads, never memory-mapped, so the model is held once and only
    the dequantization of one layer at a time comes on top. Call `load_quantized` first to check the codes.
    """
    directory = Path(directory)
    qc, model_class, config, weights = _read_folder(directory, None)
    model = build_from_config(model_class, directory, config, dtype)  # uninitialized: no page is touched
    file = SafetensorsReader(weights)
    for name, spec in qc["modules"].items():  # as nn.Linear, (out, in), also where the model has a Conv1D
        linear = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], device="meta")
        grid = [file[f"{name}.{t}"] for t in GRID_TENSORS]
        linear.weight = nn.Parameter(dequantize_codes(*grid, spec["group_size"], dtype), requires_grad=False)
        _replace(model, name, linear)
        trim_heap()
    skip = {f"{name}.{t}" for name in qc["modules"] for t in (*GRID_TENSORS, "residual")}
    for key in (k for k in file if k not in skip):
        tensor = file[key]
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor
    for alias, source in qc.get("tied", {}).items():
        _tie(model, alias, source)
    return model.eval()
