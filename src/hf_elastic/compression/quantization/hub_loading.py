"""Load a GPTQ or compressed-tensors INT4/INT8 checkpoint (a folder or a Hub id) as a model with `QuantLinear` layers,
and rebuild the rounding residual that QA-SparsePEFT trains through from the float model it was quantized from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ...models.arch import weight_out_in
from ...models.loading import build_from_config, is_hub_id, load_config
from ...utils import load_safetensors, typed_fields
from .format import QuantLinear
from .hub_formats import (
    COMPRESSED_TENSORS,
    GPTQ,
    GPTQSettings,
    check_compressed_tensors_config,
    compressed_tensors_module,
    gptq_module,
    hub_quantization,
)
from .quantize import _replace
from .rtn import _grouped, residual_codes

SOURCE_ATTR = "hf_elastic_source_format"
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


@dataclass
class QuantizedBaseConfig:
    """How a GPTQ or compressed-tensors INT4/INT8 base is loaded for QA-SparsePEFT (`load_hub_quantized`)."""

    float_model: str | None = field(
        default=None,
        metadata={
            "help": "The float model (folder or Hub id) that a GPTQ or compressed-tensors INT4/INT8 base was "
            "quantized from. Its weights rebuild each weight's rounding residual, which QA-SparsePEFT trains "
            "through (a codes-only base trains worse). Give the same float model to search and export the adapter: "
            "the merge rounds with the residual too."
        },
    )
    float_model_tolerance: float = field(
        default=1.0,
        metadata={
            "help": "Refuse a float model whose weights lie on average more than this many grid steps from the "
            "base's dequantized weights (it is not the model the codes were made from). Round-to-nearest gives "
            "about 0.25, GPTQ a little more."
        },
    )

    @typed_fields()
    def __post_init__(self) -> None:
        if not self.float_model_tolerance > 0:
            raise ValueError(
                f"QuantizedBaseConfig.float_model_tolerance={self.float_model_tolerance!r} must be > 0 (grid steps), "
                "e.g. 1.0."
            )


def hub_checkpoint(name_or_path: str | Path, revision: str | None = None) -> Path | None:
    """The local folder of `name_or_path` when it is a GPTQ or compressed-tensors checkpoint, else None. A Hub id is
    downloaded (its json, safetensors and tokenizer files) only when its `config.json` names one of the formats."""
    path = Path(name_or_path)
    if path.is_dir():
        return path if hub_quantization(path) is not None else None
    if not is_hub_id(str(name_or_path)):
        return None
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config = Path(hf_hub_download(str(name_or_path), "config.json", revision=revision))
    except Exception:  # not reachable or not a model repo: the caller's own loader reports it
        return None
    if hub_quantization(config.parent) is None:
        return None
    return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=_HUB_FILES))


def _load_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" ({', '.join(others)} are pickles: convert them to safetensors first)" if others else ""
        raise FileNotFoundError(f"No *.safetensors in {folder}{hint}.")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_safetensors(file, "download the checkpoint again")[0])
    return tensors, str(files[0] if len(files) == 1 else folder / "*.safetensors")


def load_hub_quantized(
    name_or_path: str | Path,
    *,
    float_model: str | Path | nn.Module | None = None,
    float_model_tolerance: float = 1.0,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a GPTQ (AutoGPTQ / GPTQModel) or compressed-tensors `pack-quantized` INT4/INT8 checkpoint with
    `QuantLinear` layers holding its exact codes, scales and zero points (see `hub_formats`), for QA-SparsePEFT.

    Args:
        name_or_path: the checkpoint folder or Hub id.
        float_model: the float model it was quantized from (folder, Hub id or model): rebuilds each layer's rounding
            residual (`rebuild_residual`), with which QA-SparsePEFT trains as on hf_elastic's own INT4 bases.
            Without it the base holds codes only.
        float_model_tolerance: see `QuantizedBaseConfig`.
        revision: branch, tag or commit of a Hub id.
        dtype: the dtype of the float tensors; default: the checkpoint's.

    The model remembers where it came from (`model.hf_elastic_source_format`), which the GPTQ export reuses.
    """
    QuantizedBaseConfig(None, float_model_tolerance)
    folder = hub_checkpoint(name_or_path, revision)
    if folder is None:
        raise ValueError(
            f"{name_or_path} is not a GPTQ or compressed-tensors checkpoint (no quantization_config with quant_method "
            "'gptq' or 'compressed-tensors' in its config.json, and no quantize_config.json)."
        )
    fmt, qconfig, qfile = hub_quantization(folder)
    settings = GPTQSettings.from_config(qconfig, qfile) if fmt == GPTQ else None
    if fmt == COMPRESSED_TENSORS:
        check_compressed_tensors_config(qconfig, qfile)
    model = _build(folder, dtype)
    tensors, files = _load_tensors(folder)
    suffix = ".qweight" if fmt == GPTQ else ".weight_packed"
    names = sorted(key.removesuffix(suffix) for key in tensors if key.endswith(suffix))
    if not names:
        raise ValueError(f"{files} holds no {suffix.lstrip('.')} tensor, though {qfile} describes a {fmt} checkpoint.")
    for name in names:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{files} quantizes {name}, which {type(model).__name__} does not have.") from None
        if not isinstance(old, nn.Linear):
            raise ValueError(
                f"{files} quantizes {name}, a {type(old).__name__}; hf_elastic reads quantized nn.Linear."
            )
        shape = (old.out_features, old.in_features)
        if fmt == GPTQ:
            codes, scales, zeros, group_size = gptq_module(tensors, name, shape, settings, files)
            bits, symmetric = settings.bits, settings.symmetric
            extra = (".qweight", ".qzeros", ".scales", ".g_idx")
        else:
            codes, scales, zeros, bits, group_size, symmetric = compressed_tensors_module(tensors, name, shape, files)
            extra = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")
        bias = tensors.pop(f"{name}.bias", None)
        new = QuantLinear(shape[1], shape[0], bits, group_size, symmetric, bias is not None, dtype=old.weight.dtype)
        new.set_quantized(codes, scales, zeros)
        if bias is not None:
            new.bias.data.copy_(bias)
        _replace(model, name, new)
        for key in extra:
            tensors.pop(name + key, None)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    loaded = tuple(f"{name}." for name in names)  # set above: codes, scales, zero points (and bias)
    missing = [k for k in missing if k not in tied and not k.startswith(loaded)]
    if missing or unexpected:
        raise ValueError(
            f"{files} does not match {type(model).__name__} built from its config.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    model.tie_weights()
    setattr(model, SOURCE_ATTR, {"format": fmt, "quantization_config": qconfig})
    if float_model is not None:
        rebuild_residual(model, float_model, float_model_tolerance, option="float_model")
    return model.eval()


def _build(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    import transformers

    config = load_config(folder)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(
            f"{folder / 'config.json'} names architectures={config.architectures}, unknown to transformers."
        )
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layers are hf_elastic's QuantLinear, not the format's own
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return build_from_config(model_class, folder, config, dtype)


def _float_model(source: str | Path | nn.Module, option: str) -> tuple[nn.Module, str]:
    if isinstance(source, nn.Module):
        return source, f"the {option} model"
    from ...models.loading import load_causal_lm

    path = Path(source)
    if not path.is_dir() and not is_hub_id(str(source)):
        raise FileNotFoundError(f"{option} {source}: neither a model folder nor a Hub model id.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{option} {source} is not a model folder (no config.json).")
    if path.is_dir() and hub_quantization(path) is not None:
        raise ValueError(f"{option} {source} is itself a quantized checkpoint; pass the float model it was made from.")
    try:
        model = load_causal_lm(str(source), dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise type(error)(f"{option} {source}: {error}") from None
    return model, f"{option} {source}"


def rebuild_residual(
    model: nn.Module, float_model: str | Path | nn.Module, tolerance: float = 1.0, *, option: str = "float_model"
) -> nn.Module:
    """Give every `QuantLinear` of `model` the rounding residual of the float model it was quantized from, in place.

    The residual of a weight `w` with code `q` is `w / s + z - q` (in 1/254 grid steps, clipped to under half a step
    so that the codes stay as they are; see `hf_elastic.compression.quantization.format`). For round-to-nearest codes
    it equals what `quantize(..., keep_residual=True)` keeps. Raises a ValueError naming the module when the float
    model lacks it, has another shape, or lies on average more than `tolerance` grid steps away (another model).
    """
    source, where = _float_model(float_model, option)
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        try:
            weight = weight_out_in(source.get_submodule(name)).detach().float()
        except (AttributeError, ValueError):
            raise ValueError(
                f"{where} has no linear layer {name}; it is not the model the base was quantized from."
            ) from None
        shape = (module.out_features, module.in_features)
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"{where}: {name} is {tuple(weight.shape)}, the quantized base's is {shape}; pass the float model the "
                "base was quantized from."
            )
        gs = module.group_size
        scales, zeros = module.scales[..., None], module.zeros[..., None]
        codes = _grouped(module.qweight, gs)
        steps = _grouped(weight.to(scales.device), gs) / scales + zeros.float() - codes.float()
        distance = float(steps.abs().mean())
        if not distance <= tolerance:
            raise ValueError(
                f"{where}: the weights of {name} lie {distance:.2f} grid steps from the quantized base's on average "
                f"(tolerance {tolerance}); it is not the model the base was quantized from. Pass that one, or raise "
                f"{option}{'-' if option.startswith('--') else '_'}tolerance if it is."
            )
        module.residual = (
            residual_codes(_grouped(weight, gs), scales, zeros, codes).view(shape).to(module.qweight.device)
        )
    return model
